"""``override_value``: a Python value written in Hydra's override grammar, taken literally."""

from __future__ import annotations

import math
import re
from typing import Any

_BACKSLASHES_BEFORE_INTERPOLATION = re.compile(r"(\\*)\$\{")
_BACKSLASHES_BEFORE_QUOTE = re.compile(r"(\\*)'")
_TRAILING_BACKSLASHES = re.compile(r"(\\+)$")


def override_value(value: Any) -> str:
    """``value`` written in Hydra's override grammar, taken literally: strings are
    single-quoted and escaped for Hydra, and ``${`` is escaped so that OmegaConf does not
    read it as an interpolation (a password ``p${x}\\`` stays ``p${x}\\``).

    Raises:
        ValueError: a value Hydra overrides cannot carry (e.g. a non-identifier dict key).
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write the non-finite number {value!r} as an override")
        return repr(value)
    if isinstance(value, str):
        # Taken literally: OmegaConf reads "${" as an interpolation, and N backslashes
        # before it as N/2 backslashes (an odd one escapes the "${"), so write 2N+1.
        value = _BACKSLASHES_BEFORE_INTERPOLATION.sub(lambda m: m.group(1) * 2 + "\\${", value)
        # Hydra unescapes \' and a run of backslashes before a quote (2N → N).
        escaped = _BACKSLASHES_BEFORE_QUOTE.sub(lambda m: m.group(1) * 2 + "\\'", value)
        escaped = _TRAILING_BACKSLASHES.sub(lambda m: m.group(1) * 2, escaped)
        return f"'{escaped}'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(x) for x in value) + "]"
    if isinstance(value, dict):
        items = []
        for k, x in value.items():
            if not (isinstance(k, str) and re.fullmatch(r"[A-Za-z_][\w\-]*", k)):
                raise ValueError(f"cannot write the dict key {k!r} as an override "
                                 "(expected letters, digits, '_' or '-')")
            items.append(f"{k}:{override_value(x)}")
        return "{" + ",".join(items) + "}"
    raise ValueError(f"cannot write a {type(value).__name__} ({value!r}) as an override")
