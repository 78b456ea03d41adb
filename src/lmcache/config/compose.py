"""Compose lmcache's configuration from the installed ``lmcache.conf`` package.

vLLM owns the command line of the processes lmcache runs in, so the vLLM
integration cannot use ``@hydra.main``; it composes the same config tree with
Hydra's compose API instead. :func:`compose_config` is safe to call any number of
times, from several threads, and from inside a running Hydra application (whose
global Hydra state is restored afterwards).
"""

from __future__ import annotations

import importlib.resources
import threading
from collections.abc import Sequence

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
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


def compose_config(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose ``config_name`` from the ``lmcache.conf`` package with Hydra overrides.

    Args:
        overrides: Hydra override strings, e.g. ``["chunk_size=512",
            "storage/backends=[local_cpu,local_disk]", "deployment=cpu"]``.
        config_name: the primary config's name in ``lmcache.conf`` (``config``).

    Returns:
        The composed, unresolved ``DictConfig`` (without the ``hydra`` node).
        Interpolations resolve when read; lmcache's resolvers are registered.

    Raises:
        hydra.errors.ConfigCompositionException / MissingConfigException:
            an override names an unknown group, option or key.
        TypeError: ``overrides`` is a single string instead of a list of strings.
        ValueError: a multi-select group lists an option twice (:func:`check_group_lists`).
    """
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of strings, got the string {overrides!r}")
    overrides = [str(o) for o in overrides]
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
                return compose(config_name=config_name, overrides=overrides)
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
