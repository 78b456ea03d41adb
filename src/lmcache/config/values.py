"""Parsers for LMCache config values (typed YAML values or environment strings); the
formatting of a value as a Hydra override is :mod:`lmcache.config.overrides`.

Every parser returns the parsed value or raises ValueError saying what was expected
(the caller adds the key and the source).
"""

from __future__ import annotations

import ast
import json
import math
from typing import Any, Callable

_TRUE = {"true", "1", "yes", "y", "on", "t"}
_FALSE = {"false", "0", "no", "n", "off", "f"}
_NONE = {"", "none", "null"}


def unquote(value: str) -> str:
    """An environment value without its surrounding quotes, as LMCache 0.5.6 reads
    ``LMCACHE_*`` variables (``_parse_quoted_string``): ``"'/nvme/kv'"`` → ``/nvme/kv``,
    escapes inside a quoted string resolved as a Python literal (``"'a\\tb'"`` → a TAB b),
    an unparsable quoted string just loses its outer quotes; surrounding spaces are stripped."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in ("'", '"'):
        try:
            evaluated = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value[1:-1]
        if isinstance(evaluated, str):
            return evaluated
    return value


def boolean(value: Any) -> bool:
    """true/false; strings true/1/yes/on and false/0/no/off (any case); ints 0 and 1."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        s = value.strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
    raise ValueError("expected a boolean (true/false, 1/0)")


_LMCACHE_FALSE_WORDS = {"yes", "y", "on", "t"}


def lmcache_boolean(value: Any) -> bool:
    """:func:`boolean` for LMCache's own values, where a string means what LMCache 0.5.6 reads
    (``_to_bool``: only "true" and "1", any case, are true): "yes", "y", "on" and "t", which
    LMCache reads as false, are refused rather than read the other way."""
    if isinstance(value, str) and value.strip().lower() in _LMCACHE_FALSE_WORDS:
        raise ValueError(f"LMCache 0.5.6 reads {value!r} as false (only true/1 are true); "
                         "write true or false")
    return boolean(value)


def integer(value: Any) -> int:
    """An int, or a string of one (no bools, no fractions)."""
    if isinstance(value, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError("expected an integer")


def number(value: Any) -> float:
    """A finite int or float, or a string of one (no bools)."""
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            raise ValueError("expected a number") from None
    else:
        raise ValueError("expected a number")
    if not math.isfinite(result):
        raise ValueError("expected a finite number")
    return result


def positive_int(value: Any) -> int:
    result = integer(value)
    if result <= 0:
        raise ValueError("expected an integer > 0")
    return result


def positive_float(value: Any) -> float:
    result = number(value)
    if result <= 0:
        raise ValueError("expected a number > 0")
    return result


def non_negative_float(value: Any) -> float:
    result = number(value)
    if result < 0:
        raise ValueError("expected a number >= 0")
    return result


MAX_TIMEOUT_S = 86400
"""The longest timeout a config may give (one day): far beyond any useful wait, and below what
``socket.settimeout`` and lock waits accept (larger values raise OverflowError at run time)."""


def port(value: Any) -> int:
    """A TCP port: an integer in 1..65535 (or a string of one)."""
    result = integer(value)
    if not 1 <= result <= 65535:
        raise ValueError(f"expected a TCP port in 1..65535, got {result}")
    return result


def at_most(parser: Callable[[Any], Any], limit: float, unit: str) -> Callable[[Any], Any]:
    """``parser``, then refuse a result above ``limit`` (``unit`` names it in the message)."""
    def parse(value: Any) -> Any:
        result = parser(value)
        if result > limit:
            raise ValueError(f"expected at most {_shown(limit)} {unit}, got {_shown(result)}")
        return result

    return parse


def _shown(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value.strip()


def optional_str(value: Any) -> str | None:
    """None, or a string; "", "none" and "null" (any case, as from an env var) mean None."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("expected a string or null")
    return None if value.strip().lower() in _NONE else value.strip()


def local_disk_path(value: Any) -> str | None:
    """LMCache's local_disk: a directory, plain or as ``file://<path>``; None for no disk."""
    path = optional_str(value)
    if path is None:
        return None
    if path.startswith("file://"):
        path = path[len("file://"):]
    if not path:
        raise ValueError("expected a directory path")
    if "," in path:
        raise ValueError("expected one directory (several local_disk paths are not supported)")
    return path


def optional_dict(value: Any) -> dict | None:
    """None, a mapping, or a JSON object string (as from an env var)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in _NONE:
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("expected a JSON object") from None
    if not isinstance(value, dict):
        raise ValueError("expected a mapping")
    return dict(value)


def any_list(value: Any) -> list | None:
    """None, a list, or a comma-separated string of items (as from an env var)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        if value.strip().lower() in _NONE:
            return None
        return [item.strip() for item in value.split(",") if item.strip()]
    return [value]


_TYPE_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number",
               str: "a string", dict: "a mapping", list: "a list", type(None): "null"}


def strict(parser: Callable[[Any], Any], *types: type | None) -> Callable[[Any], Any]:
    """A parser of an already-typed value (a composed Hydra config): ``value`` must be an
    instance of one of ``types`` (``None`` allows null; a bool passes only where ``bool``
    is listed, an int where ``float`` is), then ``parser(value)`` checks its range.

    The returned parser raises ValueError "expected <types>, got <type> <value>"; a string
    where another type is expected gets a hint (Hydra reads a quoted value as a string).
    """
    kinds = tuple(type(None) if t is None else t for t in types)
    accepted = kinds + ((int,) if float in kinds and int not in kinds else ())

    def parse(value: Any) -> Any:
        ok = isinstance(value, accepted) and (not isinstance(value, bool) or bool in kinds)
        if not ok:
            expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in kinds)
            hint = ("; a quoted command-line value is a string: write it unquoted"
                    if isinstance(value, str) else "")
            raise ValueError(f"expected {expected}, got {type(value).__name__} {value!r}{hint}")
        return None if value is None else parser(value)

    return parse


def one_of(*choices: str) -> Callable[[Any], str]:
    """A parser accepting exactly one of the strings ``choices``."""
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def hash_seed(value: Any) -> str | None:
    """The NONE_HASH seed: a string (taken as is, not stripped) or None.

    vLLM and LMCache seed the prefix-hash chain with a string (``PYTHONHASHSEED``); an int
    is refused rather than guessed at, with a hint to quote it.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("expected a string of Unicode text; it holds a lone surrogate, "
                             "which cannot be hashed (UTF-8)") from None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"expected a string or null, got the integer {value}; quote it "
                         f"('{value}'): vLLM and LMCache seed the hash chain with a string")
    raise ValueError(f"expected a string or null, got {type(value).__name__} {value!r}")


def like(default: Any, value: Any) -> Any:
    """Parse ``value`` as the type of ``default`` (None default: any value, lists lenient)."""
    if isinstance(default, bool):
        return boolean(value)
    if isinstance(default, int):
        return integer(value)
    if isinstance(default, float):
        return number(value)
    if isinstance(default, str):
        return value if isinstance(value, str) else str(value)
    if isinstance(value, str) and value.strip().lower() in _NONE:
        return None
    return value


def port_list(value: Any) -> list[int] | None:
    """None, or a list of ports (0..65535; 0 = a free port, picked at bind time), one per
    worker (LMCache's ``*_ports`` keys; a comma-separated string or one port is accepted, as
    LMCache's env form)."""
    items = any_list(value)
    if items is None:
        return None
    if not items:
        raise ValueError("expected at least one port")
    return [0 if integer(x) == 0 else port(x) for x in items]
