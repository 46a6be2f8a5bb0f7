"""The YAML loader: defaults, expansion, and an error with its path for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from eventrelay import config as cfg
from eventrelay.cli import main as cli_main
from eventrelay.delivery.targets.sqs import SqsConfig
from eventrelay.delivery.targets.stomp import StompAddress, StompConfig
from eventrelay.units import parse_duration

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """
integrations:
  - name: erp
    integration_type: webhook
    observes: [order.paid]
    configuration: {url: "https://erp.example.com/hook"}
"""


def errors_of(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.parse(text, environ=environ or {})
    return info.value.errors


def test_example_config_is_valid_without_environment() -> None:
    config = cfg.load(REPO / "config.example.yaml", environ={})
    assert config.listen.http == ("127.0.0.1", 8787)
    assert config.listen.socket == REPO / "var" / "eventrelay.sock"
    assert config.storage.path == REPO / "var" / "eventrelay.db"
    assert config.storage.synchronous == "full"
    (erp,) = config.integrations
    assert erp.name == "erp-orders" and erp.observes == ("order.paid", "order.fulfilled")
    assert erp.configuration.secret_key is None  # ${ERP_SECRET:-} with the variable unset


def test_defaults_fill_what_is_left_out() -> None:
    config = cfg.parse(MINIMAL)
    (erp,) = config.integrations
    assert erp.enabled is True
    assert erp.delivery == cfg.DeliveryConfig(timeout=10.0, concurrency=8,
                                              retry=cfg.RetryConfig(1.0, 600.0, 86400.0))
    assert config.listen.max_body_size == 1024 * 1024
    assert config.shutdown_grace == 10.0


def test_integration_delivery_overrides_merge_over_global() -> None:
    config = cfg.parse("""
delivery: {timeout: 3s, concurrency: 2, retry: {initial: 250ms, max_age: 7d}}
integrations:
  - name: a
    integration_type: webhook
    observes: ["*"]
    configuration: {url: "http://127.0.0.1:1/x"}
    delivery: {concurrency: 16, retry: {max_interval: 5m}}
""")
    d = config.integrations[0].delivery
    assert (d.timeout, d.concurrency) == (3.0, 16)
    assert d.retry == cfg.RetryConfig(initial=0.25, max_interval=300.0, max_age=7 * 86400.0)


# One grammar for the config and the CLI (see tests/test_units.py): weeks are a unit too.
@pytest.mark.parametrize("text,seconds", [("250ms", 0.25), ("10s", 10), ("5m", 300), ("24h", 86400),
                                          ("7d", 604800), (30, 30.0), ("1.5s", 1.5), ("1w", 604800)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["10", "ten seconds", "5 minutes", "-1s", True, "1y", "1 week"])
def test_bad_durations_are_errors(bad: object) -> None:
    with pytest.raises(ValueError, match="duration|negative"):
        parse_duration(bad)


def test_environment_expansion() -> None:
    text = MINIMAL.replace('"https://erp.example.com/hook"', '"https://${HOST}/hook?a=$${literal}"') + \
        "    description: ${DESC:-none}\n"
    config = cfg.parse(text, environ={"HOST": "erp.internal"})
    assert config.integrations[0].configuration.url == "https://erp.internal/hook?a=${literal}"
    assert config.integrations[0].description == "none"


def test_missing_variable_without_default_is_an_error() -> None:
    text = MINIMAL.replace('{url: "https://erp.example.com/hook"}',
                           '{url: "https://erp.example.com/hook", secret_key: "${ERP_SECRET}"}')
    assert errors_of(text) == ["integrations[0].configuration.secret_key: environment variable ERP_SECRET "
                               "is not set (set it, or write ${ERP_SECRET:-} to allow it to be empty)"]


def test_every_error_is_reported_with_its_path() -> None:
    errors = errors_of("""
listen: {http: "nonsense", socket: null, tokn: x}
storage: {synchronous: sometimes}
delivery: {timeout: 10 seconds, concurrency: 0, retry: {initial: 1m, max_interval: 1s}}
integrations:
  - name: ok
    integration_type: webhook
    observes: [order.paid]
    configuration: {url: "https://a.example/"}
  - name: "bad name!"
    integration_type: webhook
    observes: [Order.Paid, "order.*", "*"]
    configuration: {url: "ftp://files.example/x"}
  - name: ok
    integration_type: carrier-pigeon
    observes: []
    configuration: {}
""")
    for expected in ["listen.tokn: unknown key (did you mean 'token'?)",
                     "listen.http: 'nonsense' is not host:port (e.g. 127.0.0.1:8787 or [::1]:8787)",
                     "storage.synchronous: 'sometimes' must be one of full, normal",
                     "delivery.timeout: '10 seconds' is not a duration (write e.g. 250ms, 10s, 5m, 24h, 7d)",
                     "delivery.concurrency: 0 must be a whole number from 1 to 1000",
                     "delivery.retry.max_interval: must be at least retry.initial (60s)",
                     "integrations[1].name: 'bad name!' must be 1-64 letters, digits, - or _",
                     "integrations[1].observes[0]: 'Order.Paid' is not an event key (order.paid), "
                     "a wildcard (order.*) or *",
                     "integrations[1].configuration.url: not an http(s) URL",
                     "integrations[2].integration_type: 'carrier-pigeon' is not one of webhook, aws_sqs, stomp",
                     "integrations[2].observes: required: a non-empty list of event keys, "
                     "e.g. [order.paid, \"customer.*\"]"]:
        assert expected in errors
    assert len(errors) == 11


def test_duplicate_names_and_duplicate_yaml_keys() -> None:
    errors = errors_of(MINIMAL + MINIMAL.replace("integrations:\n", ""))
    assert errors == ["integrations[1].name: 'erp' is already used by integrations[0]"]
    errors = errors_of("storage: {path: a.db}\nstorage: {path: b.db}\n")
    assert len(errors) == 1 and "duplicate key 'storage'" in errors[0] and "line 2" in errors[0]


QUEUES = """
integrations:
  - name: inventory
    integration_type: aws_sqs
    observes: [order.paid, stock-transaction.created]
    configuration:
      url: https://sqs.eu-west-1.amazonaws.com/123456789012/inventory.fifo
      aws_access_key_id: AKIA1234
      aws_secret_access_key: ${AWS_SECRET}
      message_group_id: "{data.relationships.order.id}"
  - name: crm
    integration_type: stomp
    observes: ["customer.*", address.updated]
    configuration:
      addresses: [stomp+ssl://b-1.mq.eu-west-1.amazonaws.com:61614, "stomp://127.0.0.1:61613"]
      destination: /queue/crm.customers
      username: crm
      password: ${CRM_MQ_PASSWORD}
      vhost: /shop
      heartbeat: 5s
"""


def test_sqs_and_stomp_integrations() -> None:
    config = cfg.parse(QUEUES, environ={"AWS_SECRET": "aws-secret-XYZW", "CRM_MQ_PASSWORD": "mq-password-PSYQ"})
    sqs, stomp = (i.configuration for i in config.integrations)
    assert isinstance(sqs, SqsConfig) and isinstance(stomp, StompConfig)
    assert sqs.region == "eu-west-1" and sqs.fifo and sqs.message_group_id == "{data.relationships.order.id}"
    assert sqs.endpoint_url is None and sqs.aws_secret_access_key == "aws-secret-XYZW"
    assert stomp.addresses == (StompAddress("b-1.mq.eu-west-1.amazonaws.com", 61614, True),
                               StompAddress("127.0.0.1", 61613, False))
    assert (stomp.destination, stomp.username, stomp.vhost, stomp.heartbeat) == ("/queue/crm.customers", "crm",
                                                                                 "/shop", 5.0)
    shown = [i.public() for i in config.integrations]
    assert shown[0]["configuration"]["aws_secret_access_key"] == "****XYZW"
    assert shown[1]["configuration"]["password"] == "****PSYQ"
    assert shown[1]["configuration"]["addresses"][0] == "stomp+ssl://b-1.mq.eu-west-1.amazonaws.com:61614"
    assert config.event_source.startswith("eventrelay://")


def test_queue_configuration_errors() -> None:
    errors = errors_of("""
integrations:
  - name: q
    integration_type: aws_sqs
    observes: [order.paid]
    configuration: {url: "http://127.0.0.1:5000/123/q", aws_access_key_id: AKIA, message_group_id: "{data..x}"}
  - name: s
    integration_type: stomp
    observes: [order.paid]
    configuration: {addresses: ["amqp://broker:5672", "stomp://nohost"], ca_file: /nonexistent/ca.pem}
""")
    assert errors == [
        "integrations[0].configuration: give both aws_access_key_id and aws_secret_access_key, or neither "
        "(then the default AWS credential chain is used)",
        "integrations[0].configuration.region: required: the queue URL does not name a region",
        "integrations[0].configuration.message_group_id: {data..x} is not an event field "
        "(id, type, data.…, included.…)",
        "integrations[1].configuration.addresses[0]: 'amqp://broker:5672' is not a broker URI "
        "(e.g. stomp+ssl://b-1.mq.eu-west-1.amazonaws.com:61614 or stomp://127.0.0.1:61613)",
        "integrations[1].configuration.addresses[1]: 'stomp://nohost' is not a broker URI "
        "(e.g. stomp+ssl://b-1.mq.eu-west-1.amazonaws.com:61614 or stomp://127.0.0.1:61613)",
        "integrations[1].configuration.destination: required, e.g. /queue/orders",
        "integrations[1].configuration.ca_file: '/nonexistent/ca.pem' is not a readable file",
    ]


@pytest.mark.parametrize("text", ["[1, 2", "listen: [", "- a\nb: c", "\t x: 1"])
def test_broken_yaml_is_an_error_not_a_traceback(text: str) -> None:
    (error,) = errors_of(text)
    assert "invalid YAML" in error


def test_both_listeners_disabled_is_an_error() -> None:
    assert errors_of("listen: {http: null, socket: null}") == [
        "listen: both http and socket are disabled: producers could not reach the daemon"]


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "er.yaml"
    path.parent.mkdir()
    path.write_text("storage: {path: ./state/er.db}\nlisten: {socket: er.sock}\n")
    config = cfg.load(path, environ={})
    assert config.storage.path == tmp_path / "etc" / "state" / "er.db"
    assert config.listen.socket == tmp_path / "etc" / "er.sock"


def test_socket_mode_and_sizes() -> None:
    config = cfg.parse('listen: {socket_mode: "0600", max_body_size: 512KiB}')
    assert config.listen.socket_mode == 0o600 and config.listen.max_body_size == 512 * 1024
    assert any("is not a size" in e for e in errors_of("listen: {max_body_size: lots}"))


def test_connection_limits() -> None:
    config = cfg.parse("listen: {max_connections: 50, idle_timeout: 30s}")
    assert config.listen.max_connections == 50 and config.listen.idle_timeout == 30.0
    assert cfg.parse("{}").listen.idle_timeout == 75.0
    assert errors_of("listen: {idle_timeout: 0s}") == ["listen.idle_timeout: '0s' must be greater than zero"]
    assert errors_of("listen: {max_connections: 0}") == ["listen.max_connections: 0 must be a whole number from 1 to 1000000"]


def test_secrets_are_masked_when_shown() -> None:
    config = cfg.parse(MINIMAL.replace('{url: "https://erp.example.com/hook"}',
                                       '{url: "https://erp.example.com/hook", secret_key: "s3cr3t-PSYQ"}'))
    shown = config.integrations[0].public()
    assert shown["configuration"]["secret_key"] == "****PSYQ"
    assert "s3cr3t" not in repr(shown)
    assert cfg.mask("short") == "****"


def test_check_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(MINIMAL)
    assert cli_main(["check-config", "--config", str(good)]) == 0
    assert "OK, 1 integration(s), 1 enabled" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.replace("https://erp.example.com/hook", "erp.example.com").replace("webhook", "webhok"))
    assert cli_main(["check-config", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "integrations[0].integration_type: 'webhok' is not one of webhook, aws_sqs, stomp" in err

    assert cli_main(["check-config", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read the file" in capsys.readouterr().err


def test_commented_examples_in_the_reference_config_are_valid_when_uncommented() -> None:
    import re

    text = (REPO / "config.example.yaml").read_text()
    uncommented = re.sub(r"(?m)^  # (?=- |  )", "  ", text)
    assert uncommented != text
    config = cfg.parse(uncommented, source=REPO / "config.example.yaml",
                       environ={"AWS_KEY": "AKIA", "AWS_SECRET": "s", "CRM_MQ_PASSWORD": "p"})
    assert [i.integration_type for i in config.integrations] == ["webhook", "aws_sqs", "stomp"]


def test_credentials_inside_urls_are_masked_when_shown() -> None:
    config = cfg.parse("""
integrations:
  - name: erp
    integration_type: webhook
    observes: [order.paid]
    configuration: {url: "https://erp:hunter2-long-pass@erp.example.com/hook?tenant=shop&token=abcdef123456&sig=x"}
""")
    shown = config.integrations[0].public()["configuration"]["url"]
    assert shown == "https://erp:****pass@erp.example.com/hook?tenant=shop&token=****3456&sig=****"
    # The integration itself still sends the real URL.
    assert "hunter2-long-pass" in config.integrations[0].configuration.url


def test_elastic_path_options() -> None:
    config = cfg.parse(MINIMAL + "store_id: b33e328f-31a8-4d57-b0a3-ebf1039b3756\n")
    assert config.store_id == "b33e328f-31a8-4d57-b0a3-ebf1039b3756"
    assert config.integrations[0].configuration.send_resources is True
    assert errors_of(MINIMAL + "store_id: 'has spaces'\n") == [
        "store_id: 'has spaces' must be 1-256 printable ASCII characters without spaces"]


FILTERED = """
integrations:
  - name: erp
    integration_type: webhook
    observes: [order.paid]
    filter: {filter}
    configuration: {{url: "http://127.0.0.1:9/x"}}
"""


def test_a_filter_is_compiled_and_shown_and_its_errors_name_the_path() -> None:
    config = cfg.parse(FILTERED.format(filter='{"data.total": {"$gte": 100}, "$not": {"data.test": true}}'),
                       environ={})
    (erp,) = config.integrations
    assert erp.public()["filter"] == {"data.total": {"$gte": 100}, "$not": {"data.test": True}}
    assert erp.accepts({"type": "order.paid", "data": {"total": 120}, "included": None}) is True
    assert erp.accepts({"type": "order.paid", "data": {"total": 120, "test": True}, "included": None}) is False
    assert errors_of(FILTERED.format(filter='{"data.total": {"$gte": [1]}}')) == [
        "integrations[0].filter.data.total.$gte: $gte compares with a number or a string, not a list"]
    assert errors_of(FILTERED.format(filter='{"$or": [{"total": 1}]}')) == [
        "integrations[0].filter.$or[0].total: a path starts with type, data or included, not 'total'"]


def test_an_observes_entry_that_matches_no_known_type_is_an_error_with_a_suggestion() -> None:
    text = FILTERED.replace("    filter: {filter}\n", "").replace("[order.paid]", "{observes}")
    assert errors_of(text.format(observes="[order.payed, ordr.*, loyalty-points.created]")) == [
        "integrations[0].observes[0]: 'order.payed' matches no known event type (did you mean order.paid?); "
        "a type of your own goes under event_types: at the top of the file",
        "integrations[0].observes[1]: 'ordr.*' matches no known event type (did you mean order.*?); "
        "a type of your own goes under event_types: at the top of the file",
        "integrations[0].observes[2]: 'loyalty-points.created' matches no known event type; "
        "a type of your own goes under event_types: at the top of the file"]
    # Declared types, Elastic Path's families and the catch-all are fine.
    config = cfg.parse("event_types: [loyalty-points.created]\n" + text.format(
        observes='[loyalty-points.created, "loyalty-points.*", subscription-plan.updated, "account-member.*", "*"]'),
        environ={})
    assert config.event_types == ("loyalty-points.created",)
    assert errors_of("event_types: [Loyalty.Points]\n" + text.format(observes="[order.paid]")) == [
        "event_types[0]: 'Loyalty.Points' is not an event key (resource.action, lower case)"]
