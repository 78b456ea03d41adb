"""Parsers of LMCache values and their formatting as Hydra overrides."""

from __future__ import annotations

import math

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from lmcache.config import values as v


@pytest.mark.parametrize("value", [
    "plain", "with space", "it's", "back\\slash", "ends\\", "quote\\'mix", "a,b", "x=y",
    "valkey-cluster://h1:7000,h2:7001", "/path/with [brackets]", "", 0, -7, 1.5, 1e-05,
    True, False, None, [1, "a b", 2.5], {"a": 1, "b": "x y", "c-d": [True, None]},
])
def test_override_value_round_trips_through_hydras_parser(value):
    parsed = OverridesParser.create().parse_overrides([f"key={v.override_value(value)}"])[0]
    assert parsed.value() == value
    if isinstance(value, float):
        assert isinstance(parsed.value(), float)


@pytest.mark.parametrize("value", [math.inf, {"a.b": 1}, {1: 2}, object()])
def test_override_value_rejects_what_overrides_cannot_carry(value):
    with pytest.raises(ValueError, match="cannot write"):
        v.override_value(value)


def test_parsers():
    assert v.boolean("TRUE") is True and v.boolean(0) is False
    assert v.integer("  42 ") == 42 and v.integer(8.0) == 8
    assert v.number("2.5") == 2.5 and v.number(3) == 3.0
    assert v.optional_str("None") is None and v.optional_str(" x ") == "x"
    assert v.local_disk_path("file:///mnt/nvme/") == "/mnt/nvme/"
    assert v.local_disk_path("/mnt/nvme") == "/mnt/nvme"
    assert v.optional_dict('{"a": 1}') == {"a": 1} and v.optional_dict("") is None
    assert v.any_list("1, 2,3") == ["1", "2", "3"]
    assert v.like(0.0, "0") == 0.0 and v.like(None, "null") is None and v.like(5555, "5555") == 5555


@pytest.mark.parametrize(("parser", "value", "message"), [
    (v.boolean, "maybe", "expected a boolean"),
    (v.boolean, 2, "expected a boolean"),
    (v.integer, True, "got a boolean"),
    (v.integer, "1.5", "expected an integer"),
    (v.integer, 2.5, "expected an integer"),
    (v.number, "nan", "finite"),
    (v.number, [1], "expected a number"),
    (v.positive_int, 0, "> 0"),
    (v.non_negative_float, -0.1, ">= 0"),
    (v.string, "  ", "non-empty string"),
    (v.optional_str, 5, "string or null"),
    (v.local_disk_path, "/a,/b", "several local_disk paths"),
    (v.local_disk_path, "file://", "directory path"),
    (v.optional_dict, "[1]", "expected a mapping"),
])
def test_parser_errors_say_what_was_expected(parser, value, message):
    with pytest.raises(ValueError, match=message):
        parser(value)
