"""daemon/codec.py: orjson in front, the standard library as the reference behind it.

The fast path must accept exactly what the strict standard decoder accepts and decode it to the same value
(same types too: an int stays an int of any size, floats round the same way), and encode what it decodes
back to text that the standard library reads as the same value.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from eventrelay import codec

# JSON values as the standard library would decode them: any int, finite floats, any text without lone
# surrogates (those are not Unicode, and both paths reject their escapes).
_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _text
values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_text, inner, max_size=5),
                      max_leaves=30)


def reference(raw: bytes) -> Any:
    return codec._loads_exactly(raw)


def same(a: Any, b: Any) -> bool:
    """Equal, with equal types all the way down (1 == 1.0 == True in Python, not in JSON)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(values, st.booleans())
@example(2**64, False)
@example(-(2**63) - 1, False)
@example(12345678901234567890123, True)
@example([1e16, 1e-7, 5e-324, 1.7976931348623157e308, -0.0], False)
def test_decodes_like_the_standard_library(value: Any, ascii_only: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    decoded = codec.loads(raw, max_depth=1000)
    assert same(decoded, reference(raw))
    assert same(json.loads(codec.dumps(decoded)), decoded)


@pytest.mark.parametrize("raw", [
    b'{"amount": 1e400}', b"NaN", b"[Infinity]", b'"\\ud800"', b'{"\\udfff": 1}', b'"a\x00"', b"\xef\xbb\xbf{}",
    b"{'a': 1}", b"[1,]", b"", b"\xff", b"[" * 2000 + b"]" * 2000,
])
def test_rejects_what_the_standard_library_rejects_with_its_message(raw: bytes) -> None:
    with pytest.raises(ValueError) as fast:
        codec.loads(raw)
    with pytest.raises(ValueError) as slow:
        reference(raw)
    assert str(fast.value) == str(slow.value)


@given(st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
def test_any_bytes_either_decode_like_the_reference_or_fail_with_its_message(raw: bytes) -> None:
    try:
        expected: Any = reference(raw)
    except ValueError as e:
        with pytest.raises(ValueError, match=None) as got:
            codec.loads(raw)
        assert str(got.value) == str(e)
    else:
        assert same(codec.loads(raw), expected)


def test_big_integers_are_kept_exactly_even_next_to_small_ones() -> None:
    raw = b'{"order": 123456789012345678901234567890, "qty": 2, "price": 9.99}'
    decoded = codec.loads(raw)
    assert decoded == {"order": 123456789012345678901234567890, "qty": 2, "price": 9.99}
    assert codec.dumps(decoded) == '{"order":123456789012345678901234567890,"qty":2,"price":9.99}'


@pytest.mark.parametrize("depth", [1, 5, 63, 64, 65, 200])
def test_max_depth(depth: int) -> None:
    raw = b'{"a":' * (depth - 1) + b"[1]" + b"}" * (depth - 1)
    if depth <= 64:
        assert codec.depth(codec.loads(raw, 64)) == depth
    else:
        with pytest.raises(ValueError, match="deeper than listen.max_depth"):
            codec.loads(raw, 64)


def test_depth_of_scalars_and_empty_containers() -> None:
    assert [codec.depth(v) for v in (1, "x", None, [], {}, [[]], [{}, [[1]]])] == [0, 0, 0, 1, 1, 2, 3]


@pytest.mark.parametrize("big", [False, True])
def test_max_depth_of_one_item_in_a_batch(big: bool) -> None:
    leaf = b"123456789012345678901234567890" if big else b"1"
    shallow = b'{"type": "order.paid", "data": {"a": [1, {"b": "[[[[[[[[[[[[[[[["}]}}'
    for depth in (63, 64, 65):  # of the whole body: the batch's array is one level
        deep = b'{"a":' * (depth - 2) + b"[" + leaf + b"]" + b"}" * (depth - 2)
        raw = b"[" + b",".join([shallow] * 30 + [deep] + [shallow] * 5) + b"]"
        if depth <= 64:
            assert codec.depth(codec.loads(raw, 64)) == depth
        else:
            with pytest.raises(ValueError, match="deeper than listen.max_depth"):
                codec.loads(raw, 64)


def _with_repeated_key(value: Any, data: st.DataObject) -> str | None:
    """JSON text of `value` in which one object repeats one of its keys, written in one of the ways JSON
    allows (as is, with escapes, white space before the colon); None when `value` has no non-empty object."""
    objects = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node:
                objects.append(node)
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(value)
    if not objects:
        return None
    target = data.draw(st.sampled_from(objects))
    key = data.draw(st.sampled_from(sorted(target)))
    spelling = data.draw(st.sampled_from(["plain", "ascii", "spaced"]))
    repeated = json.dumps(key, ensure_ascii=spelling == "ascii") + (" : " if spelling == "spaced" else ":")
    extra = data.draw(st.sampled_from(['"x:y"', '"\\u003a"', "1", "{}", '{"k":"a:b"}']))
    # Rebuild the text with the repeat spliced in after the object's first member.
    def encode(node: Any) -> str:
        if isinstance(node, dict):
            members = [f"{json.dumps(k)}:{encode(v)}" for k, v in node.items()]
            if node is target:
                members.insert(1, f"{repeated}{extra}")
            return "{" + ",".join(members) + "}"
        if isinstance(node, list):
            return "[" + ",".join(encode(v) for v in node) + "]"
        return json.dumps(node)

    return encode(value)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(values, st.data())
def test_a_repeated_key_is_refused_wherever_it_is(value: Any, data: st.DataObject) -> None:
    text = _with_repeated_key(value, data)
    if text is None:
        return
    with pytest.raises(ValueError, match="duplicate key"):
        codec.loads(text.encode(), max_depth=1000)


@pytest.mark.parametrize("raw", [
    b'{"a": "x:y", "b": "\\u003a"}', b'{"a\\\\": 1, "a": 2}', b'{"a" : {"a": 1}}', b'[{"a": 1}, {"a": 1}]',
    b'{"t": "12:30", "u": "http://h:1/p"}',
])
def test_keys_that_look_alike_but_are_not_repeated_are_accepted(raw: bytes) -> None:
    assert same(codec.loads(raw), json.loads(raw))
