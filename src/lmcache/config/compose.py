"""Compose lmcache's configuration from the installed ``lmcache.conf`` package.

vLLM owns the command line of the processes lmcache runs in, so the vLLM
integration cannot use ``@hydra.main``; it composes the same config tree with
Hydra's compose API instead. :func:`compose_config` is safe to call any number of
times, from several threads, and from inside a running Hydra application (whose
global Hydra state is restored afterwards).
"""

from __future__ import annotations

import difflib
import importlib.resources
import inspect
import re
import threading
from collections.abc import Sequence

import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.utils import get_class
from hydra.version import VersionBase
from omegaconf import DictConfig, OmegaConf

CONFIG_MODULE = "lmcache.conf"
"""The Python package holding the YAML config tree (the repository's ``conf/``)."""

HYDRA_VERSION_BASE = "1.3"

_GIB = 1024**3
_lock = threading.Lock()


def gib_to_bytes(size_gib: float | int | str) -> int:
    """Convert a size in GiB (LMCache's "GB" unit: 1 GB = 1024**3 bytes) to bytes.

    Registered as the OmegaConf resolver ``lmcache.gib_to_bytes`` so that option
    files can write ``size_bytes: ${lmcache.gib_to_bytes:${max_local_cpu_size}}``.

    Raises:
        ValueError: ``size_gib`` is not a number (booleans are rejected too).
    """
    if isinstance(size_gib, bool):
        raise ValueError(f"expected a size in GiB (a number), got {size_gib!r}")
    try:
        value = float(size_gib)
    except (TypeError, ValueError):
        raise ValueError(f"expected a size in GiB (a number), got {size_gib!r}") from None
    return int(round(value * _GIB))


def register_resolvers() -> None:
    """Register lmcache's OmegaConf resolvers (idempotent)."""
    if not OmegaConf.has_resolver("lmcache.gib_to_bytes"):
        OmegaConf.register_new_resolver("lmcache.gib_to_bytes", gib_to_bytes)


def _conf_dir(group: str = ""):
    node = importlib.resources.files(CONFIG_MODULE)
    for part in filter(None, group.split("/")):
        node = node / part
    return node


def list_options(group: str) -> list[str]:
    """Option names of a config group of the installed tree, e.g. ``list_options(
    "storage/policy") == ["fifo", "lfu", "lru", "mru"]``; ``[]`` for an unknown group."""
    node = _conf_dir(group)
    if not node.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in node.iterdir()
                  if p.name.endswith(".yaml") and p.is_file())


def list_groups() -> list[str]:
    """Every config group (a folder holding option YAML files) of the installed tree,
    as ``/``-separated paths, sorted (e.g. ``["allocator", ..., "storage/backends"]``)."""
    groups: list[str] = []

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir() and not child.name.startswith(("_", ".")):
                path = f"{prefix}{child.name}"
                if list_options(path):
                    groups.append(path)
                walk(child, path + "/")

    walk(_conf_dir(), "")
    return sorted(groups)


def check_group_lists(overrides: Sequence[str]) -> None:
    """Refuse an override that selects an option of a multi-select group twice.

    Hydra merges a multi-select group's options into one node keyed by option name, so
    ``storage/backends=[local_cpu,local_cpu]`` would silently become one tier; the list
    is checked here, where it is still visible (a composed config no longer shows it).
    Overrides Hydra cannot parse are left to Hydra's own error.

    Raises:
        ValueError: a group's option list names an option twice (the message names it).
    """
    groups = None
    for text in overrides:
        try:
            override = OverridesParser.create().parse_overrides([text])[0]
        except OverrideParseException:
            continue
        if override.is_delete() or override.is_sweep_override():
            continue
        value = override.value()
        if not isinstance(value, list):
            continue
        groups = list_groups() if groups is None else groups
        if override.key_or_group not in groups:
            continue
        twice = sorted({str(x) for x in value if value.count(x) > 1})
        if twice:
            raise ValueError(
                f"{text!r} selects {' and '.join(twice)} twice: {override.key_or_group} takes "
                "each option once (Hydra would merge the copies into one, silently)")


def override_sources(overrides: Sequence[str], sources: str | Sequence[str] | None) -> list[str]:
    """One source label per override: ``sources`` as given (a list as long as
    ``overrides``), one label for all (a str), or ``"compose_config overrides"`` (None).

    Raises:
        ValueError: a list of sources of another length than ``overrides``.
    """
    if sources is None:
        return ["compose_config overrides"] * len(overrides)
    if isinstance(sources, str):
        return [sources] * len(overrides)
    sources = [str(s) for s in sources]
    if len(sources) != len(overrides):
        raise ValueError(f"{len(sources)} sources for {len(overrides)} overrides")
    return sources


def parse_overrides(overrides: Sequence[str], sources: Sequence[str]) -> list[Override]:
    """Each override parsed by Hydra's grammar, one at a time.

    Raises:
        ValueError: "malformed override <text> (from <source>): <Hydra's reason>".
    """
    parsed = []
    for text, source in zip(overrides, sources):
        try:
            override = OverridesParser.create().parse_overrides([text])[0]
            if not override.key_or_group:
                raise OverrideParseException(text, "no key before '='")
            parsed.append(override)
        except OverrideParseException as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(
                f"malformed override {text!r} (from {source}): {reason}; expected key=value, "
                "group=option, group=[a,b], +key=value (add) or ~key (delete), see "
                "https://hydra.cc/docs/advanced/override_grammar/basic/") from None
    return parsed


def _primary_keys(config_name: str) -> list[str]:
    node = _conf_dir()
    for part in config_name.split("/"):
        node = node / part
    data = yaml.safe_load((node.parent / f"{node.name}.yaml").read_text()) or {}
    return [k for k in data if k != "defaults"]


def _did_you_mean(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, sorted(set(known)), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _check_added_keys(cfg: DictConfig, parsed: Sequence[Override], overrides: Sequence[str],
                      sources: Sequence[str], config_name: str) -> None:
    """Refuse a key added with ``+``/``++`` that nothing reads: a top-level key that is not
    one of the primary config's keys or groups, or a key of an option (a node with
    ``_target_``) that its class's constructor does not take."""
    from lmcache.config.top_level_keys import TOP_LEVEL_KEYS

    groups = list_groups()
    top = (set(_primary_keys(config_name)) | set(_primary_keys("config")) | set(TOP_LEVEL_KEYS)
           | {g.split("/")[0] for g in groups})
    for override, text, source in zip(parsed, overrides, sources):
        if not (override.is_add() or override.is_force_add()) or override.package is not None:
            continue
        key = override.key_or_group
        if key in groups or "/" in key:
            continue
        path = key.split(".")
        if len(path) == 1:
            if key not in top:
                raise ValueError(f"override {text!r} (from {source}) adds the key {key!r}, which "
                                 f"lmcache does not read{_did_you_mean(key, list(top))}")
            continue
        parent = OmegaConf.select(cfg, ".".join(path[:-1]), throw_on_missing=False)
        target = parent.get("_target_") if isinstance(parent, DictConfig) else None
        if not isinstance(target, str):
            continue
        try:
            params = [n for n, p in inspect.signature(get_class(target)).parameters.items()
                      if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        except Exception:  # noqa: BLE001 - a class that cannot be imported fails at build
            continue
        if path[-1] not in params:
            raise ValueError(
                f"override {text!r} (from {source}) adds the key {path[-1]!r} to "
                f"{'.'.join(path[:-1])} ({target}), which takes no such argument"
                f"{_did_you_mean(path[-1], params)}")


def _named_composition_error(e: ConfigCompositionException, parsed: Sequence[Override],
                             overrides: Sequence[str], sources: Sequence[str],
                             config_name: str) -> Exception:
    """Hydra's "Could not override 'x'" (a key not in the config) as a ValueError naming
    the override, its source and the close keys; other errors get a note naming the sources."""
    match = re.match(r"Could not override '([^']+)'", str(e))
    if match:
        key = match.group(1)
        for override, text, source in zip(parsed, overrides, sources):
            if override.key_or_group == key:
                known = _primary_keys(config_name) + [g.split("/")[0] for g in list_groups()]
                return ValueError(f"override {text!r} (from {source}) sets the key {key!r}, which "
                                  f"is not in lmcache's config{_did_you_mean(key.split('.')[-1], known)}"
                                  " (a new key needs a leading '+')")
    e.add_note("(overrides: " + "; ".join(f"{t!r} from {s}" for t, s in zip(overrides, sources))
               + ")")
    return e


def compose_config(overrides: Sequence[str] = (), config_name: str = "config",
                   sources: str | Sequence[str] | None = None) -> DictConfig:
    """Compose ``config_name`` from the ``lmcache.conf`` package with Hydra overrides.

    Args:
        overrides: Hydra override strings, e.g. ``["chunk_size=512",
            "storage/backends=[local_cpu,local_disk]", "deployment=cpu"]``.
        config_name: the primary config's name in ``lmcache.conf`` (``config``).
        sources: where the overrides came from, for error messages: one label per override,
            one label for all, or None (``"compose_config overrides"``).

    Returns:
        The composed, unresolved ``DictConfig`` (without the ``hydra`` node).
        Interpolations resolve when read; lmcache's resolvers are registered.

    Raises:
        ValueError: a malformed override, a key set without ``+`` that the config does not
            have, or a key added with ``+`` that nothing reads (each names the override, its
            source and, where one is close, the key meant: ``+chunk_sise=512`` → "did you
            mean chunk_size?"); a multi-select group that lists an option twice
            (:func:`check_group_lists`).
        hydra.errors.ConfigCompositionException / MissingConfigException: an unknown group
            or option (with a note naming the overrides' sources).
        TypeError: ``overrides`` is a single string instead of a list of strings.
    """
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of strings, got the string {overrides!r}")
    overrides = [str(o) for o in overrides]
    sources = override_sources(overrides, sources)
    parsed = parse_overrides(overrides, sources)
    check_group_lists(overrides)
    register_resolvers()
    with _lock:
        saved_hydra = GlobalHydra.instance().hydra
        saved_base = VersionBase.instance().getbase()
        GlobalHydra.instance().clear()
        try:
            with initialize_config_module(
                config_module=CONFIG_MODULE, version_base=HYDRA_VERSION_BASE
            ):
                try:
                    cfg = compose(config_name=config_name, overrides=overrides)
                except ConfigCompositionException as e:
                    raise _named_composition_error(e, parsed, overrides, sources,
                                                   config_name) from None
            _check_added_keys(cfg, parsed, overrides, sources, config_name)
            return cfg
        finally:
            # initialize_config_module restored the (cleared) state it found; put
            # back whatever Hydra state the caller had, e.g. a running @hydra.main.
            gh = GlobalHydra.instance()
            gh.clear()
            if saved_hydra is not None:
                gh.initialize(saved_hydra)
            # (the caller's version_base may be Hydra's "unspecified" sentinel,
            # which setbase() rejects, hence the plain assignment)
            VersionBase.instance().version_base = saved_base
