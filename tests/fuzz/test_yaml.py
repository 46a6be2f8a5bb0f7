"""Fuzzing the YAML loader: arbitrary documents, token soup, mutated example configs, and the inputs that once
made it raise something other than ConfigError.

Part of the fuzzing of what strangers can send; tests/fuzz/oracle.py holds the oracle written from the README's
ingest contract, the strategies and the bridge between hypothesis and the daemon's loop.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from eventrelay import config as config_module
from eventrelay.config import ConfigError
from hypothesis import given, settings
from hypothesis import strategies as st

from ..conftest import REPO
from .oracle import (
    examples,
)

# -- property 4: the YAML loader ----------------------------------------------------------------------------------

YAML_OUTCOMES: Counter[str] = Counter()


def check_parse(text: str) -> None:
    """config.parse returns a Config or raises ConfigError with a non-empty list of strings: nothing else."""
    try:
        result = config_module.parse(text, environ={})
    except ConfigError as e:
        assert isinstance(e.errors, list) and e.errors, f"ConfigError without errors for {text!r}"
        assert all(isinstance(m, str) and m for m in e.errors), e.errors
        YAML_OUTCOMES["ConfigError"] += 1
        return
    assert isinstance(result, config_module.Config), result
    YAML_OUTCOMES["Config"] += 1


def run_yaml_property(prop: Callable[[], None], name: str) -> None:
    YAML_OUTCOMES.clear()
    started = time.monotonic()
    prop()
    print(f"{name}: {dict(YAML_OUTCOMES)} in {time.monotonic() - started:.1f}s")
    assert YAML_OUTCOMES["ConfigError"], "the generators no longer reach the parser's error paths"


KNOWN_KEYS = ["listen", "storage", "delivery", "integrations", "shutdown_grace", "log", "event_source", "http",
              "socket", "socket_mode", "token", "max_body_size", "max_depth", "max_connections", "idle_timeout", "path",
              "synchronous", "retention", "dead_retention", "prune_interval", "level", "format", "timeout",
              "connect_timeout", "concurrency", "retry", "breaker", "rate_limit", "ordering", "ordering_key",
              "dead_letter", "initial", "max_interval", "max_age", "max_attempts", "failures", "failure_rate",
              "window", "cooldown", "max_cooldown", "name", "description", "enabled", "integration_type",
              "observes", "configuration", "url", "secret_key", "signing_secret", "region", "aws_access_key_id",
              "aws_secret_access_key", "endpoint_url", "message_group_id", "max_message_size", "addresses",
              "destination", "username", "password", "vhost", "heartbeat", "ca_file", "request_timeout",
              "file_mode", "store_id", "send_resources", "backend", "dsn", "schema", "pool", "lease"]
INTERESTING = ["10s", "250ms", "5m", "24h", "7d", "0s", "-1s", "1.5h", "1MiB", "512KiB", "0", "1GB", "0660", "0o777",
               "999", "127.0.0.1:8787", "[::1]:0", "localhost:99999", ":80", "order.paid", "order.*", "*", "Order",
               "webhook", "aws_sqs", "stomp", "http://127.0.0.1:9/h", "https://sqs.eu-west-1.amazonaws.com/1/q.fifo",
               "stomp://h:61613", "stomp+ssl://[::1]:1", "ftp://x", "${X}", "${X:-d}", "$$", "${", "full", "normal",
               "debug", "json", "per_resource", "{data.id}", "{nope}", "50/s", "0/s", "whsec_" + "QUJD" * 8,
               "whsec_!", "./var/x.db", "/dev/null", "", " ", "\x00", "~", "ünï", "erp-orders", "postgresql", "sqlite",
               "postgresql://u:pw@127.0.0.1:5432/db?connect_timeout=2", "postgres://h:x/db", "eventrelay", "Bad-Name"]
yaml_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(10**30), 10**30) | st.floats()
                | st.sampled_from(INTERESTING) | st.text(max_size=12))
yaml_keys = st.sampled_from(KNOWN_KEYS) | st.text(max_size=10) | st.integers(-5, 5) | st.none() | st.booleans()
yaml_values = st.recursive(yaml_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(yaml_keys, c, max_size=5),
                           max_leaves=25)


def dump(value: Any, flow: bool | None) -> str:
    return yaml.safe_dump(value, default_flow_style=flow, allow_unicode=True, sort_keys=False)


def test_config_parse_of_arbitrary_yaml_documents() -> None:
    @settings(max_examples=examples(800))
    @given(value=yaml_values, flow=st.sampled_from([None, False, True]))
    def prop(value: Any, flow: bool | None) -> None:
        check_parse(dump(value, flow))

    run_yaml_property(prop, "arbitrary YAML")


def test_config_parse_of_config_shaped_documents() -> None:
    sections = st.fixed_dictionaries({}, optional={key: yaml_values for key in
                                                   ("listen", "storage", "delivery", "shutdown_grace", "log",
                                                    "event_source")})
    integration = st.fixed_dictionaries({}, optional={
        "name": st.sampled_from(["erp", "crm", "a" * 65, "bad name"]) | yaml_scalars,
        "integration_type": st.sampled_from(["webhook", "aws_sqs", "stomp", "smtp"]) | yaml_scalars,
        "observes": st.lists(st.sampled_from(["order.paid", "order.*", "*", "Order", ""]) | yaml_scalars, max_size=3)
        | yaml_scalars,
        "configuration": st.dictionaries(st.sampled_from(KNOWN_KEYS), yaml_scalars | yaml_values, max_size=6)
        | yaml_scalars,
        "delivery": st.dictionaries(st.sampled_from(KNOWN_KEYS), yaml_values, max_size=4),
        "enabled": yaml_scalars, "description": yaml_scalars,
    })

    @settings(max_examples=examples(600))
    @given(top=sections, items=st.lists(integration, max_size=3) | yaml_scalars)
    def prop(top: dict[str, Any], items: Any) -> None:
        check_parse(dump({**top, "integrations": items}, None))

    run_yaml_property(prop, "config-shaped YAML")


YAML_TOKENS = ["listen:", "storage:", "integrations:", "delivery:", "shutdown_grace:", "  ", "    ", "\n", "- ", ": ",
               "[", "]", "{", "}", ", ", "? ", "&a ", "*a", "!!int ", "!!float ", "!!str ", "!!bool ", "!!binary ",
               "!!timestamp ", "!!set ", "!!omap ", "!!python/object ", "<<: ", "2001-13-45", "2001-02-03",
               "0x1F", "0b2", "1_000", "12:30", ".nan", ".inf", "~", "null", "'q'", '"\\x00"', '"\\ud800"', "#c",
               "---", "...", "%YAML 1.1\n", "|\n", ">\n", "\t", "yes", "10s", "\x00", "\ufeff", "\x85"]


def test_config_parse_of_yaml_token_soup_and_random_text() -> None:
    @settings(max_examples=examples(800))
    @given(text=st.lists(st.sampled_from(YAML_TOKENS) | st.text(max_size=6), max_size=40).map("".join)
           | st.text(max_size=300)
           | st.binary(max_size=300).map(lambda b: b.decode("utf-8", "replace"))
           | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
    def prop(text: str) -> None:
        check_parse(text)

    run_yaml_property(prop, "token soup and random text")


def _example_base() -> dict[str, Any]:
    """config.example.yaml, plus its commented SQS and STOMP integrations: a valid file to mutate."""
    raw = yaml.safe_load((REPO / "config.example.yaml").read_text())
    raw["integrations"] += [
        {"name": "inventory", "integration_type": "aws_sqs", "observes": ["order.paid", "stock-transaction.created"],
         "configuration": {"url": "https://sqs.eu-west-1.amazonaws.com/123456789012/inventory",
                           "region": "eu-west-1", "aws_access_key_id": "AKIA", "aws_secret_access_key": "s3cr3t",
                           "endpoint_url": None, "message_group_id": "{data.id}", "max_message_size": "256KiB"}},
        {"name": "crm", "integration_type": "stomp", "observes": ["customer.*", "address.updated"],
         "configuration": {"addresses": ["stomp+ssl://b-1.mq.eu-west-1.amazonaws.com:61614",
                                         "stomp+ssl://b-2.mq.eu-west-1.amazonaws.com:61614"],
                           "destination": "/queue/crm.customers", "username": "crm", "password": "pw",
                           "vhost": None, "heartbeat": "10s", "ca_file": None}},
    ]
    return raw


EXAMPLE_BASE = _example_base()
EXAMPLE_TEXT = (REPO / "config.example.yaml").read_text()


def test_config_example_and_mutation_base_are_valid() -> None:
    assert config_module.parse(EXAMPLE_TEXT, environ={}).integrations
    assert len(config_module.parse(dump(EXAMPLE_BASE, None), environ={}).integrations) == 3


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            found += _paths(child, (*prefix, i))
    return found


def _at(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


@st.composite
def mutated_examples(draw: st.DrawFn) -> str:
    doc = json.loads(json.dumps(EXAMPLE_BASE))  # a deep copy
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, last = _at(doc, path[:-1]), path[-1]
        how = draw(st.sampled_from(["delete", "retype", "retype", "unknown", "scalar"]))
        if how == "delete":
            del parent[last]
        elif how == "retype":  # a value of another type: list for a mapping, number for a string, ...
            parent[last] = draw(yaml_values)
        elif how == "scalar":
            parent[last] = draw(st.sampled_from(INTERESTING) | yaml_scalars)
        else:
            target = _at(doc, path) if isinstance(_at(doc, path), dict) else parent
            if isinstance(target, dict):
                target[draw(st.sampled_from(KNOWN_KEYS) | st.text(max_size=8))] = draw(yaml_scalars)
    return dump(doc, draw(st.sampled_from([None, False, True])))


@st.composite
def mutated_example_text(draw: st.DrawFn) -> str:
    lines = EXAMPLE_TEXT.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["delete", "duplicate", "indent", "dedent", "insert", "swap"]))
        if how == "delete":
            del lines[i]
        elif how == "duplicate":  # a duplicate key, usually
            lines.insert(i, lines[i])
        elif how == "indent":
            lines[i] = "  " + lines[i]
        elif how == "dedent":
            lines[i] = lines[i][2:] if lines[i].startswith("  ") else lines[i]
        elif how == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + draw(st.sampled_from(YAML_TOKENS) | st.text(max_size=5)) + lines[i][at:]
        if not lines:
            break
    return "".join(lines)


def test_config_parse_of_mutated_example_configs() -> None:
    @settings(max_examples=examples(800))
    @given(text=mutated_examples() | mutated_example_text())
    def prop(text: str) -> None:
        check_parse(text)

    run_yaml_property(prop, "mutated config.example.yaml")
    assert YAML_OUTCOMES["Config"], "no mutation left a valid config: the base is broken"


_YAML_CONSTRUCTOR = ("BUG: config.parse catches only yaml.YAMLError, but PyYAML's SafeLoader constructors raise "
                     "ValueError/KeyError/AttributeError/IndexError for bad scalars: a traceback instead of a "
                     "ConfigError with the line")
_STRICT_LOADER = ("BUG: _StrictLoader.construct_mapping walks node.value and puts keys in a set before SafeLoader's "
                  "construct_mapping checks that the node is a mapping and its keys hashable: a sequence/mapping as "
                  "a key (TypeError), or a !!map/!!set tag on a scalar or sequence (ValueError/TypeError), escape as "
                  "tracebacks")
def _crash(text: str, name: str, raises: type[BaseException], reason: str) -> Any:
    """An input that once made config.parse raise `raises` (`reason`); now it must be a ConfigError."""
    return pytest.param(text, id=name)


CONFIG_CRASHES = [
    _crash("? [a]\n: 1\n", "unhashable-key", TypeError, _STRICT_LOADER),
    _crash("x: !!set abc\n", "set-tag-on-scalar", ValueError, _STRICT_LOADER),
    _crash("x: !!map [a]\n", "map-tag-on-sequence", TypeError, _STRICT_LOADER),
    _crash("integrations:\n- {name: a, integration_type: [], observes: [order.paid]}\n", "unhashable-integration-type",
           TypeError, "BUG: _Parser.integration looks integration_type up in a dict ({...}.get(itype)) after only "
                      "reporting that it is not one of the types: a list or mapping there raises TypeError"),
    _crash("shutdown_grace: 2001-13-45\n", "impossible-date", ValueError, _YAML_CONSTRUCTOR),
    _crash("shutdown_grace: !!int abc\n", "int-tag", ValueError, _YAML_CONSTRUCTOR),
    _crash("log: !!bool maybe\n", "bool-tag", KeyError, _YAML_CONSTRUCTOR),
    _crash("shutdown_grace: !!timestamp soon\n", "timestamp-tag", AttributeError, _YAML_CONSTRUCTOR),
    _crash("shutdown_grace: !!float\n", "empty-float-tag", IndexError, _YAML_CONSTRUCTOR),
    _crash("shutdown_grace: " + "1" * 4301 + "\n", "int-over-4300-digits", ValueError,
           _YAML_CONSTRUCTOR + " (here Python's 4300-digit limit on int from decimal text)"),
    _crash("shutdown_grace: 1" + "0" * 400 + "\n", "huge-duration", OverflowError,
           "BUG: _duration and _rate call float() on a YAML int: OverflowError above ~1.8e308 (a typo of many "
           "zeros), which value() does not turn into an error"),
    _crash("? 0x" + "f" * 4000 + "\n: 1\n", "huge-int-key", ValueError,
           "BUG: a key that is an int of more than 4300 digits (hex may be that long) cannot be formatted into its "
           "error path: ValueError from str() in _expand_env/_join"),
    _crash("integrations: &a [*a]\n", "recursive-alias", RecursionError,
           "BUG: a recursive YAML alias makes a list that contains itself; _expand_env recurses forever"),
    _crash("listen: " + "[" * 2000 + "]" * 2000 + "\n", "deep-nesting", RecursionError,
           "BUG: PyYAML composes nested collections recursively: deep nesting raises RecursionError, uncaught"),
    _crash("storage: {path: '~nosuchuser/er.db'}\n", "unknown-user-home", RuntimeError,
           "BUG: Path.expanduser raises RuntimeError for ~user of an unknown user (Python 3.11); _Parser.path() "
           "only turns ValueError into an error"),
]


@pytest.mark.parametrize("text", CONFIG_CRASHES)
def test_bug_config_parse_raises_something_else_than_ConfigError(text: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_module.parse(text, environ={})
    assert e.value.errors and all(isinstance(m, str) for m in e.value.errors)
