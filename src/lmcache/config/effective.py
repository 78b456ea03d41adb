"""The effective configuration of a process, with the source of every value that is not a
default: what lmcache logs once at start.

A value's source is the override that set it (its label: ``LMCache config file '...'``,
``environment variable LMCACHE_...``, ``kv_connector_extra_config['lmcache....']``,
``kv_connector_extra_config['lmcache.overrides']``...); a value inside an option selected by
a group override (``storage/backends=[local_cpu,local_disk]``) is summarised by that group's
line; a value a deployment sets is attributed to the ``deployment=...`` override. Values that
are interpolations of other keys (``token_database.chunk_size: ${chunk_size}``) are not
repeated: the key they read is listed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, ListConfig, OmegaConf

from lmcache.config.compose import compose_config, list_groups, override_sources, parse_overrides
from lmcache.config.remote_url import redact

logger = logging.getLogger(__name__)

_logged: set[str] = set()
_logged_lock = threading.Lock()
_defaults: dict[str, Any] = {}


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Path → value of every leaf of an unresolved config (lists are leaves)."""
    out: dict[str, Any] = {}
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}.{key}" if prefix else str(key)
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_interpolation():
                out.update(_leaves(child, path))
            else:
                out[path] = child
    return out


def _value(node: Any) -> tuple[Any, bool]:
    """(resolved plain value, whether the node is an interpolation)."""
    interpolation = hasattr(node, "_is_interpolation") and node._is_interpolation()
    if isinstance(node, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(node, resolve=True), interpolation
        except Exception:  # noqa: BLE001 - shown unresolved
            return OmegaConf.to_container(node, resolve=False), interpolation
    try:
        return node._dereference_node()._value(), interpolation
    except Exception:  # noqa: BLE001
        return node._value(), interpolation


def _default_values(config_name: str) -> dict[str, Any]:
    if config_name not in _defaults:
        base = compose_config([], config_name)
        _defaults[config_name] = {p: _value(n)[0] for p, n in _leaves(base).items()}
    return _defaults[config_name]


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return repr(redact(value))
    return repr(value)


def effective_config_lines(cfg: DictConfig, overrides: Sequence[str],
                           sources: str | Sequence[str] | None = None,
                           config_name: str = "config") -> list[str]:
    """One line per group selection and per value that differs from the default config,
    each with its source, e.g. ``"chunk_size: 512  (environment variable
    LMCACHE_CHUNK_SIZE)"``; ``[]`` when everything is a default. Passwords in urls are masked.

    Raises:
        ValueError: as :func:`lmcache.config.compose.parse_overrides`.
    """
    overrides = [str(o) for o in overrides]
    labels = override_sources(overrides, sources)
    parsed: list[Override] = parse_overrides(overrides, labels)
    groups = set(list_groups())
    lines: list[str] = []
    by_path: list[tuple[str, str, str]] = []   # (path prefix, override text, source)
    global_groups: list[tuple[str, str]] = []  # groups whose options set top-level keys
    for override, text, source in zip(parsed, overrides, labels):
        key = override.key_or_group
        if key in groups:
            lines.append(f"{key}={_plain_value(override)}  ({source})")
            node = _group_path(key)
            if node:
                by_path.append((node, text, source))
            else:
                global_groups.append((text, source))
        elif not override.is_delete():
            by_path.append((key, text, source))
    defaults = _default_values(config_name)
    for path, node in _leaves(cfg).items():
        value, interpolation = _value(node)
        if path in defaults and defaults[path] == value:
            continue
        source = None
        for prefix, text, label in reversed(by_path):
            if path == prefix or path.startswith(prefix + "."):
                source = None if (prefix != path and _is_group(prefix, groups)) else label
                break
        else:
            if interpolation:
                continue  # reads another key, which is listed itself
            if global_groups:
                source = f"{global_groups[-1][0]} ({global_groups[-1][1]})"
            else:
                source = "an option's default"
        if source is None:
            continue  # inside an option a group line already names
        if interpolation and not any(path == p for p, _, _ in by_path):
            continue
        lines.append(f"{path}: {_shown(value)}  ({source})")
    return lines


def _plain_value(override: Override) -> str:
    value = override.value()
    if isinstance(value, list):
        return "[" + ",".join(str(x) for x in value) + "]"
    return str(value)


def _group_path(group: str) -> str | None:
    """The config path a group's options merge into (None for ``deployment``, whose options
    are ``@package _global_``)."""
    return None if group == "deployment" else group.replace("/", ".")


def _is_group(prefix: str, groups: set[str]) -> bool:
    return prefix.replace(".", "/") in groups


def log_effective_config(cfg: DictConfig, overrides: Sequence[str],
                         sources: str | Sequence[str] | None = None,
                         config_name: str = "config") -> str | None:
    """Log (INFO, logger ``lmcache.config.effective``) the effective config with the source
    of every value that is not a default, once per process for each distinct config.

    Returns:
        The logged text, or None when this config was logged before.
    """
    try:
        lines = effective_config_lines(cfg, overrides, sources, config_name)
    except Exception as e:  # noqa: BLE001 - a report must never stop a start
        logger.warning("lmcache could not describe its effective config: %r", e)
        return None
    text = ("lmcache effective config (values that are not defaults, with their source):\n  "
            + "\n  ".join(lines)) if lines else "lmcache effective config: every value is a default"
    with _logged_lock:
        if text in _logged:
            return None
        _logged.add(text)
    logger.info("%s", text)
    return text
