"""Event validation and `observes` matching."""

from __future__ import annotations

import pytest

from eventrelay.events import EventError, Observes, is_observe_pattern, parse_event


@pytest.mark.parametrize("key", ["order.paid", "account-member.created", "stock-transaction.created",
                                 "subscription-plan.updated", "catalog_rule.deleted", "my-api-type.created"])
def test_well_formed_keys_are_accepted(key: str) -> None:
    assert parse_event({"type": key, "data": {}}).type == key


@pytest.mark.parametrize("key", ["Order.paid", "order", "order.", ".paid", "order paid", "order.*", "",
                                 "order..paid", "ordér.paid"])
def test_malformed_keys_are_refused(key: str) -> None:
    with pytest.raises(EventError, match="^type: .* is not an event key"):
        parse_event({"type": key, "data": {}})


def test_generated_ids_are_time_ordered_uuids_and_given_ids_are_kept() -> None:
    import uuid

    made = parse_event({"type": "order.paid", "data": {"id": "1"}})
    assert made.id_given is False
    parsed = uuid.UUID(made.id)
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122 and str(parsed) == made.id
    ids = [parse_event({"type": "order.paid", "data": {}}).id for _ in range(2000)]
    assert len(set(ids)) == 2000
    assert [i[:13] for i in ids] == sorted(i[:13] for i in ids)  # the millisecond prefix never goes back
    given = parse_event({"id": "evt-1", "type": "order.paid", "data": {}, "included": {"items": []}})
    assert (given.id, given.id_given, given.included) == ("evt-1", True, {"items": []})


@pytest.mark.parametrize("obj,message", [
    ([], "must be a JSON object, got an array"),
    ({"data": {}}, "type: required"),
    ({"type": "order.paid"}, "data: required, must be a JSON object"),
    ({"type": "order.paid", "data": [1]}, "data: must be a JSON object, got an array"),
    ({"type": "order.paid", "data": {}, "included": "x"}, "included: must be a JSON object, got a string"),
    ({"type": "order.paid", "data": {}, "id": 7}, "id: must be a string, got a number"),
    ({"type": "order.paid", "data": {}, "id": ""}, "id: must be 1 to 128 characters, got 0"),
    ({"type": "order.paid", "data": {}, "id": "x" * 129}, "id: must be 1 to 128 characters, got 129"),
    ({"type": "order.paid", "data": {}, "id": "a\nb"}, "id: must be printable ASCII"),
    ({"type": "order.paid", "data": {}, "id": " evt-1 "}, "id: must be printable ASCII without leading or trailing"),
    ({"type": "order.paid", "data": {}, "id": "évt-1"}, "id: must be printable ASCII"),
    ({"type": "order.paid", "data": {}, "tpye": "x"}, "tpye: unknown field"),
])
def test_invalid_events_name_the_field(obj: object, message: str) -> None:
    with pytest.raises(EventError) as info:
        parse_event(obj)
    assert str(info.value).startswith(message)


def test_observes_matching() -> None:
    exact = Observes.compile(["order.paid", "order.fulfilled"])
    assert exact.matches("order.paid") and not exact.matches("order.created")
    wildcard = Observes.compile(["customer.*", "address.updated"])
    assert wildcard.matches("customer.deleted") and wildcard.matches("address.updated")
    assert not wildcard.matches("customers.created") and not wildcard.matches("address.created")
    assert Observes.compile(["*"]).matches("anything.at-all")


@pytest.mark.parametrize("pattern,ok", [("order.paid", True), ("order.*", True), ("*", True),
                                        ("account-member.*", True), ("*.paid", False), ("order*", False),
                                        ("ORDER.paid", False), ("order", False)])
def test_observe_patterns(pattern: str, ok: bool) -> None:
    assert is_observe_pattern(pattern) is ok


@pytest.mark.parametrize("etype", [{"a": 1}, ["order.paid"], 1, True])
def test_a_type_that_is_not_a_string_is_refused_even_after_valid_types(etype: object) -> None:
    parse_event({"type": "order.paid", "data": {}})  # remembered as valid
    with pytest.raises(EventError, match="type: .* is not an event key"):
        parse_event({"type": etype, "data": {}})


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_producers_trace_context_is_kept_and_checked() -> None:
    event = parse_event({"type": "order.paid", "data": {}, "traceparent": TRACEPARENT, "tracestate": "shop=7"})
    assert (event.traceparent, event.tracestate) == (TRACEPARENT, "shop=7")
    assert "trace" not in event.payload  # it travels beside the payload, not in it
    later = parse_event({"type": "order.paid", "data": {}, "traceparent": "01-" + TRACEPARENT[3:] + "-more"})
    assert later.traceparent.endswith("-more")  # a later version may add fields
    for bad, message in [
        ({"traceparent": TRACEPARENT.upper()}, "traceparent: must be a W3C traceparent"),
        ({"traceparent": "00-" + "0" * 32 + TRACEPARENT[35:]}, "traceparent: the trace id and the parent id"),
        ({"traceparent": "ff" + TRACEPARENT[2:]}, "traceparent: version ff"),
        ({"traceparent": TRACEPARENT + "-x"}, "traceparent: version 00"),
        ({"traceparent": 7}, "traceparent: must be a string"),
        ({"tracestate": "shop=7"}, "tracestate: goes with a traceparent"),
        ({"traceparent": TRACEPARENT, "tracestate": "x" * 513}, "tracestate: must be printable ASCII"),
    ]:
        with pytest.raises(EventError) as info:
            parse_event({"type": "order.paid", "data": {}, **bad})
        assert str(info.value).startswith(message), bad
