"""lmcache's own config tree inside an experiment's config, and back out to the KV connector.

An experiment's primary config (``conf/experiment/*.yaml``, ``# @package _global_``) lists
``/config`` (lmcache's ``conf/config.yaml``) in its defaults, so lmcache's keys and groups sit
at the root of the experiment's config: ``deployment=cpu_disk local_disk=/nvme/kv
chunk_size=512 storage/policy=fifo`` are plain overrides, and ``--cfg job`` shows the tiers,
policy and sizes. The engine process composes its own config from ``kv_connector_extra_config``
(:func:`lmcache.integration.vllm.engine_builder.compose_from_vllm`), so
:func:`connector_overrides` turns the experiment's lmcache part back into lmcache Hydra
overrides (``lmcache.overrides``) and :func:`check_same_config` proves the engine will compose
the same tree.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

NOT_LMCACHE_GROUPS = ("experiment",)


class ExperimentConfigError(ValueError):
    """A bad value in an experiment's configuration (the message names the key)."""


def lmcache_groups() -> list[str]:
    """lmcache's config groups (``storage/backends``, ``deployment``, ...), not experiments."""
    from lmcache.config.compose import list_groups

    return [g for g in list_groups() if g.split("/")[0] not in NOT_LMCACHE_GROUPS]


def lmcache_keys() -> list[str]:
    """LMCache's top-level keys of ``conf/config.yaml`` (``chunk_size``, ``local_disk``, ...)."""
    text = (importlib.resources.files("lmcache.conf") / "config.yaml").read_text()
    node = OmegaConf.create(text)
    return [k for k in node if k != "defaults" and not isinstance(node[k], DictConfig)]


def experiment_keys(config_name: str) -> list[str]:
    """Top-level keys of the experiment's own YAML ``conf/<config_name>.yaml``."""
    node = importlib.resources.files("lmcache.conf")
    for part in config_name.split("/"):
        node = node / part
    cfg = OmegaConf.create((node.parent / f"{node.name}.yaml").read_text())
    return [k for k in cfg if k != "defaults"]


def check_known_keys(cfg: DictConfig, config_name: str) -> None:
    """Refuse a top-level key that neither the experiment nor lmcache knows (e.g. one added
    with ``+``, as Hydra's error hint suggests, but misspelled).

    Raises:
        ExperimentConfigError: naming the key and the known ones.
    """
    known = set(experiment_keys(config_name)) | set(lmcache_keys())
    known |= {g.split("/")[0] for g in lmcache_groups()}
    unknown = sorted(str(k) for k in cfg if k not in known and k != "hydra")
    if unknown:
        hint = (" (lmcache's keys and groups sit at the top level here: write local_disk=/x, "
                "deployment=cpu_disk, not lmcache.local_disk=/x)" if "lmcache" in unknown else "")
        raise ExperimentConfigError(
            f"unknown top-level key(s) {unknown}: expected experiment keys "
            f"{sorted(experiment_keys(config_name))} or lmcache keys {sorted(lmcache_keys())}"
            + hint)


def _quote(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):  # e.g. p2p_init_ports
        return "[" + ",".join(_quote(x) for x in value) + "]"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def connector_overrides(cfg: DictConfig, choices: Mapping[str, Any],
                        task_overrides: Iterable[str] = ()) -> list[str]:
    """lmcache Hydra overrides that compose the lmcache part of ``cfg`` again.

    ``choices``: Hydra's ``runtime.choices`` (group -> option; the chosen deployment is not
    repeated: its groups and keys are in the others; a multi-select group such as
    ``storage/backends``, which Hydra leaves out, is read from its node's keys in order); ``task_overrides``:
    the command line's overrides, of which those that set a value inside a group's node (e.g.
    ``storage.backends.local_disk.num_writers=2``) are kept, after the groups and keys.
    Returns e.g. ``["storage/backends=[local_cpu,local_disk]", "storage/policy=lru", ...,
    "chunk_size=256", "local_disk='/nvme/kv'", ...]``.
    """
    groups = lmcache_groups()
    out = []
    for group in groups:
        if group == "deployment":
            continue
        if group in choices:
            choice = choices[group]
        else:  # Hydra records no choice for a multi-select group: its options key its node
            node = OmegaConf.select(cfg, group.replace("/", "."))
            choice = list(node) if isinstance(node, DictConfig) else None
        if choice is None:
            continue
        if isinstance(choice, (list, tuple)) or OmegaConf.is_list(choice):
            out.append(f"{group}=[{','.join(str(c) for c in choice)}]")
        else:
            out.append(f"{group}={choice}")
    for key in lmcache_keys():
        if key in cfg:
            out.append(f"{key}={_quote(OmegaConf.select(cfg, key))}")
    nodes = tuple(g.replace("/", ".") + "." for g in groups)
    for text in task_overrides:
        key = text.split("=", 1)[0].lstrip("+~")
        if key.startswith(nodes):
            out.append(text)
    return out


def check_same_config(mine: DictConfig, engine: DictConfig) -> None:
    """The engine's composed lmcache config must equal the experiment's lmcache part.

    Raises:
        ExperimentConfigError: naming the keys whose resolved values differ.
    """
    a = OmegaConf.to_container(mine, resolve=True)
    b = OmegaConf.to_container(engine, resolve=True)
    differ = sorted(k for k in b if k != "hydra" and a.get(k) != b.get(k))
    if differ:
        raise ExperimentConfigError(
            "the engine would compose another lmcache config than the experiment's: "
            + "; ".join(f"{k}: experiment {a.get(k)!r}, engine {b.get(k)!r}" for k in differ))


def lmcache_part(cfg: DictConfig) -> dict[str, Any]:
    """The lmcache keys and group nodes of an experiment config, resolved (for logs)."""
    names: Sequence[str] = [*lmcache_keys(), *{g.split("/")[0] for g in lmcache_groups()}]
    full = OmegaConf.to_container(cfg, resolve=True)
    return {k: full[k] for k in full if k in names}


def kv_transfer_fields(kv: DictConfig, lmcache_overrides: list[str]) -> dict[str, Any]:
    """``KVTransferConfig`` fields from an experiment's ``kv_transfer`` node (``kv_connector``,
    ``kv_connector_module_path``, ``kv_role``, ``kv_load_failure_policy``) with
    ``kv_connector_extra_config = {"lmcache.overrides": lmcache_overrides}``. A null
    ``kv_connector_module_path`` is left out, so that vLLM finds the connector by name in its own
    registry (``kv_connector=LMCacheConnectorV1``, vLLM's built-in LMCache connector)."""
    fields = {"kv_connector": str(kv.kv_connector),
              "kv_connector_module_path": str(kv.kv_connector_module_path),
              "kv_role": str(kv.kv_role),
              "kv_load_failure_policy": str(kv.kv_load_failure_policy),
              "kv_connector_extra_config": {"lmcache.overrides": list(lmcache_overrides)}}
    if kv.kv_connector_module_path is None:
        del fields["kv_connector_module_path"]
    return fields


def engine_kv_transfer(cfg: DictConfig, choices: Mapping[str, Any], task_overrides: Iterable[str],
                       config_name: str, check_lmcache: bool = True) -> dict[str, Any]:
    """Check an experiment's top-level keys and lmcache's part of its config, before any
    engine starts, and return the KV-transfer fields that make the engine compose that same
    lmcache config (:func:`connector_overrides`, :func:`check_same_config`); with
    ``check_lmcache``, also lmcache's own value and tier checks
    (:func:`lmcache.config.checks.check_config`).

    Raises:
        ExperimentConfigError / ValueError: naming the bad key.
    """
    from lmcache.config.checks import check_config
    from lmcache.integration.vllm.engine_builder import compose_from_vllm

    check_known_keys(cfg, config_name)
    fields = kv_transfer_fields(cfg.kv_transfer, connector_overrides(cfg, choices, task_overrides))
    engine_cfg = compose_from_vllm(fields["kv_connector_extra_config"])
    check_same_config(cfg, engine_cfg)
    if check_lmcache:
        check_config(engine_cfg)
    return fields
