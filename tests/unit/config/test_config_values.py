"""Parsers of LMCache values and their formatting as Hydra overrides."""

from __future__ import annotations

import math

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from lmcache.config import compose_config
from lmcache.config import values as v
from lmcache.config.overrides import override_value


@pytest.mark.parametrize("value", [
    "plain", "with space", "it's", "back\\slash", "ends\\", "quote\\'mix", "a,b", "x=y",
    "valkey-cluster://h1:7000,h2:7001", "/path/with [brackets]", "", 0, -7, 1.5, 1e-05,
    True, False, None, [1, "a b", 2.5], {"a": 1, "b": "x y", "c-d": [True, None]},
])
def test_override_value_round_trips_through_hydras_parser(value):
    parsed = OverridesParser.create().parse_overrides([f"key={override_value(value)}"])[0]
    assert parsed.value() == value
    if isinstance(value, float):
        assert isinstance(parsed.value(), float)


@pytest.mark.parametrize("value", [math.inf, {"a.b": 1}, {1: 2}, object()])
def test_override_value_rejects_what_overrides_cannot_carry(value):
    with pytest.raises(ValueError, match="cannot write"):
        override_value(value)


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


LITERALS = ["/tmp/${oops}", "p${x}\\", "a\\${x}", "a\\\\${x}", "ab${cd", "$${x}", "${a}${b}",
            "${oc.env:HOME}", "x\\'${y}'\\", "c:\\dir\\${x}\\", "}${", "plain\\path"]


@pytest.mark.parametrize("text", LITERALS)
def test_override_value_is_taken_literally_not_interpolated(text):
    url = f"valkey://user:{text}@cache:6379"
    cfg = compose_config(["storage/backends=[local_cpu,remote]", "remote_connector=valkey",
                          f"remote_url={override_value(url)}",
                          f"++extra_config={override_value({'note': text, 'items': [text]})}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["remote_url"] == url
    assert resolved["remote_connector"]["url"] == url  # through the option's ${remote_url}
    assert resolved["extra_config"] == {"note": text, "items": [text]}


def test_strict_parsers_check_the_type_then_the_range():
    number = v.strict(v.positive_float, float)
    assert number(2) == 2.0 and number(0.5) == 0.5
    with pytest.raises(ValueError, match=r"^expected a number, got bool True$"):
        number(True)
    with pytest.raises(ValueError, match=r"^expected a number, got str '1'; a quoted "):
        number("1")
    with pytest.raises(ValueError, match=r"^expected a number > 0$"):
        number(-1)
    flag = v.strict(v.boolean, bool)
    assert flag(False) is False
    with pytest.raises(ValueError, match=r"^expected a boolean \(true/false\), got int 0$"):
        flag(0)
    text = v.strict(v.local_disk_path, str, None)
    assert text(None) is None and text("file:///d") == "/d"
    with pytest.raises(ValueError, match=r"^expected a string or null, got float 1.0$"):
        text(1.0)
    choose = v.one_of("a", "b")
    assert choose("b") == "b"
    with pytest.raises(ValueError, match=r"^expected one of a, b$"):
        choose("c")


def test_hash_seed_is_a_string_or_null():
    assert v.hash_seed(" 7 ") == " 7 " and v.hash_seed(None) is None and v.hash_seed("") == ""
    with pytest.raises(ValueError, match=r"got the integer 123; quote it \('123'\)"):
        v.hash_seed(123)
    with pytest.raises(ValueError, match=r"^expected a string or null, got bool True$"):
        v.hash_seed(True)
