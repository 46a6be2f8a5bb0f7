"""Integration filters (filters.py): the language by example, its errors, and many generated filters and
events checked against a reference evaluator written plainly from the README's description."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventrelay.filters import FilterError, compile_filter

ORDER = {"type": "order.paid",
         "data": {"id": "o1", "status": "paid", "channel": "web", "tags": ["vip", "eu"],
                  "meta": {"display_price": {"with_tax": {"amount": 12900, "currency": "EUR"}}},
                  "coupon": None, "test": False},
         "included": {"items": [{"sku": "A-1", "quantity": 2}, {"sku": "B-2", "quantity": 1}]}}


@pytest.mark.parametrize("spec, matches", [
    ({"data.status": "paid"}, True),
    ({"data.status": "unpaid"}, False),
    ({"type": "order.paid"}, True),
    ({"data.meta.display_price.with_tax.amount": {"$gte": 10000}}, True),
    ({"data.meta.display_price.with_tax.amount": {"$gt": 12900}}, False),
    ({"data.meta.display_price.with_tax.amount": {"$gte": 10000, "$lt": 20000}}, True),
    ({"data.meta.display_price.with_tax.currency": {"$in": ["EUR", "GBP"]}}, True),
    ({"data.meta.display_price.with_tax.currency": {"$nin": ["EUR", "GBP"]}}, False),
    ({"data.missing": {"$nin": ["x"]}}, True),
    ({"data.missing": {"$in": ["x"]}}, False),
    ({"data.coupon": {"$exists": True}}, True),  # present, though null
    ({"data.coupon": None}, True),
    ({"data.voucher": {"$exists": False}}, True),
    ({"data.voucher": None}, False),  # missing is not null
    ({"included.items.0.sku": "A-1"}, True),
    ({"included.items.5.sku": {"$exists": True}}, False),
    ({"data.tags": ["vip", "eu"]}, True),
    ({"data.tags": ["eu", "vip"]}, False),
    ({"data.test": 0}, False),  # false is not 0
    ({"data.id": {"$gt": "o0"}}, True),  # strings compare with strings
    ({"data.id": {"$gt": 5}}, False),  # ... and not with numbers
    ({"$or": [{"data.channel": "app"}, {"data.channel": "web"}]}, True),
    ({"$and": [{"data.channel": "web"}, {"data.status": "refunded"}]}, False),
    ({"$not": {"data.test": True}}, True),
    ({"data.status": {"$not": {"$in": ["refunded", "cancelled"]}}}, True),
    ({"data.status": "paid", "data.channel": "app"}, False),  # every key must hold
    ({"data.meta": {"display_price": {"with_tax": {"amount": 12900, "currency": "EUR"}}}}, True),
])
def test_the_language_by_example(spec: dict[str, Any], matches: bool) -> None:
    assert compile_filter(spec)(ORDER) is matches
    assert reference(spec, ORDER) is matches


@pytest.mark.parametrize("spec, path, words", [
    ({}, "", "must be a mapping"),
    ([1], "", "must be a mapping"),
    ({"status": "paid"}, "status", "starts with type, data or included"),
    ({"data..status": 1}, "data..status", "no empty parts"),
    ({"$nor": []}, "$nor", "unknown operator"),
    ({"data.n": {"$gte": 1, "$regex": "x"}}, "data.n.$regex", "unknown operator"),
    ({"data.n": {"$in": "paid"}}, "data.n.$in", "takes a list"),
    ({"data.n": {"$gt": [1]}}, "data.n.$gt", "compares with a number or a string"),
    ({"data.n": {"$exists": "yes"}}, "data.n.$exists", "true or false"),
    ({"$or": []}, "$or", "non-empty list"),
    ({"$or": [{"data.a": 1}, {"nope": 1}]}, "$or[1].nope", "starts with type, data or included"),
])
def test_errors_say_where(spec: Any, path: str, words: str) -> None:
    with pytest.raises(FilterError) as info:
        compile_filter(spec)
    assert info.value.path == path and words in info.value.message


# -- against a reference evaluator ---------------------------------------------------------------------------

MISSING = object()


def reference(spec: dict[str, Any], event: dict[str, Any]) -> bool:
    """The README's filter language, evaluated as plainly as it reads."""
    results = []
    for key, value in spec.items():
        if key == "$and":
            results.append(all(reference(s, event) for s in value))
        elif key == "$or":
            results.append(any(reference(s, event) for s in value))
        elif key == "$not":
            results.append(not reference(value, event))
        else:
            results.append(ref_condition(ref_lookup(event, key), value))
    return all(results)


def ref_lookup(event: dict[str, Any], path: str) -> Any:
    value: Any = event
    for part in path.split("."):
        if isinstance(value, list) and part.isdigit():
            value = value[int(part)] if int(part) < len(value) else MISSING
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return MISSING
    return value


def ref_condition(found: Any, value: Any) -> bool:
    if isinstance(value, dict) and any(k.startswith("$") for k in value):
        return all(ref_operator(found, op, arg) for op, arg in value.items())
    return found is not MISSING and ref_equal(found, value)


def is_number(x: Any) -> bool:
    return type(x) in (int, float) and not (isinstance(x, float) and math.isnan(x))


def ref_equal(a: Any, b: Any) -> bool:
    if is_number(a) and is_number(b):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return sorted(a) == sorted(b) and all(ref_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(ref_equal(x, y) for x, y in zip(a, b))
    return a == b


def ref_operator(found: Any, op: str, arg: Any) -> bool:
    if op == "$in":
        return found is not MISSING and any(ref_equal(found, c) for c in arg)
    if op == "$nin":
        return found is MISSING or not any(ref_equal(found, c) for c in arg)
    if op == "$exists":
        return (found is not MISSING) == arg
    if op == "$not":
        return not ref_condition(found, arg)
    if isinstance(arg, str):
        if not isinstance(found, str):
            return False
    elif not (is_number(found) and is_number(arg)):
        return False
    return {"$gt": found > arg, "$gte": found >= arg, "$lt": found < arg, "$lte": found <= arg}[op]


# Small domains, so generated filters and events meet often enough to match.
KEYS = st.sampled_from(["a", "b", "c"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0.5, 2.0, -1.5]),
                    st.sampled_from(["x", "y", "paid", ""]))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(KEYS, inner, max_size=3)), max_leaves=8)
EVENTS = st.fixed_dictionaries({"type": st.sampled_from(["order.paid", "order.created"]),
                                "data": st.dictionaries(KEYS, JSON, max_size=3),
                                "included": st.one_of(st.none(), st.dictionaries(KEYS, JSON, max_size=2))})
PATHS = st.builds(lambda root, rest: ".".join([root, *rest]), st.sampled_from(["data", "data", "included", "type"]),
                  st.lists(st.one_of(KEYS, st.sampled_from(["0", "1"])), max_size=3))
ORDERED = st.one_of(st.integers(-3, 3), st.sampled_from([0.5, -1.5]), st.sampled_from(["x", "y", "paid"]))


def operators() -> st.SearchStrategy[dict[str, Any]]:
    single = st.one_of(
        st.builds(lambda v: {"$in": v}, st.lists(SCALARS, max_size=3)),
        st.builds(lambda v: {"$nin": v}, st.lists(SCALARS, max_size=3)),
        st.builds(lambda v: {"$exists": v}, st.booleans()),
        st.builds(lambda op, v: {op: v}, st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), ORDERED))
    return st.one_of(single, st.builds(lambda a, b: {**a, **b}, single, single),
                     st.builds(lambda inner: {"$not": inner}, single))


FILTERS = st.recursive(
    st.dictionaries(PATHS, st.one_of(JSON, operators()), min_size=1, max_size=2),
    lambda inner: st.one_of(st.builds(lambda fs: {"$and": fs}, st.lists(inner, min_size=1, max_size=3)),
                            st.builds(lambda fs: {"$or": fs}, st.lists(inner, min_size=1, max_size=3)),
                            st.builds(lambda f: {"$not": f}, inner)),
    max_leaves=6)


def valid(spec: Any) -> bool:
    try:
        compile_filter(spec)
    except FilterError:
        return False
    return True


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FILTERS, st.lists(EVENTS, min_size=1, max_size=8))
def test_generated_filters_agree_with_the_reference(spec: dict[str, Any], events: list[dict[str, Any]]) -> None:
    if not valid(spec):  # a value mapping with a `$` key it does not know, say: refused, as it should be
        return
    test = compile_filter(spec)
    for event in events:
        assert test(event) is reference(spec, event), (spec, event)
