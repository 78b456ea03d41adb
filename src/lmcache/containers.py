"""The component graph of one lmcache process, wired from a composed config.

This is the only module that sees the whole graph. The containers wire **slots, not
implementations**: each slot's option names its class with ``_target_`` and
:func:`build` instantiates it, passing only the shared collaborators its constructor
names (``metadata``, ``allocator``, ``policy``, ``allocator_backend``, ``serde``,
``local_disk_serde``, ``remote_connector``, ``layout``, ``token_database``, ``gpu_connector``,
``storage_manager``, ``engine``, ``transfer_channel``). Collaborators are built lazily: a tier that does not
ask for ``serde`` never causes one to be built; each tier that asks for ``policy`` gets
its own CachePolicy; every tier shares the one allocator.

Use::

    container = build_worker_container(cfg, metadata, layout)
    engine = container.engine()          # builds what the engine needs, once
    ...
    shutdown(container)                  # closes engine → tiers → connector → allocator

Tests replace a slot with e.g. ``container.storage_manager.override(providers.Object(m))``.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any, Callable

from dependency_injector import containers, providers
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from lmcache.config.checks import check_config
from lmcache.engine.lmcache_engine import LMCacheEngine
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.metadata import LMCacheMetadata
from lmcache.storage.manager import StorageManager
from lmcache.storage.prefetcher import Prefetcher

logger = logging.getLogger(__name__)


def _plain(node: Any) -> Any:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _materialize(value: Any) -> Any:
    """Nested option values: a mapping with ``_target_`` is built, containers recursed."""
    if isinstance(value, Mapping):
        if "_target_" in value:
            return build(value)
        return {k: _materialize(x) for k, x in value.items()}
    if isinstance(value, (list, tuple)):
        return [_materialize(x) for x in value]
    return value


def build(node: Mapping[str, Any] | DictConfig | None, **shared: Any) -> Any:
    """Instantiate one config option; pass it only the shared objects its constructor names.

    Args:
        node: the option (``{"_target_": "pkg.module.Class", <keyword values>...}``), or
            None for a null option (``blend=none``), which builds nothing.
        **shared: collaborators offered to the constructor; one it does not name is not
            passed (and, if it is a provider, not built). A provider value is called.

    Returns:
        The new object, or None for a None node.

    Raises:
        ValueError: the node has no ``_target_``, uses another ``_key_``, or sets a key that
            is also a shared collaborator; errors of the import or of the constructor
            propagate with a note naming the target.
    """
    if node is None:
        return None
    node = _plain(node)
    if not isinstance(node, Mapping) or not isinstance(node.get("_target_"), str):
        raise ValueError(f"a config option must be a mapping with a _target_ class path, got {node!r}")
    target = node["_target_"]
    special = [k for k in node if k.startswith("_") and k.endswith("_") and k != "_target_"]
    if special:
        raise ValueError(f"option {target}: unsupported keys {special} (options hold _target_ "
                         "and keyword values only)")
    kwargs = {k: _materialize(x) for k, x in node.items() if k != "_target_"}
    try:
        cls = get_class(target)
        params = inspect.signature(cls).parameters
        for name, value in shared.items():
            if name not in params:
                continue
            if name in kwargs:
                raise ValueError(f"option {target} sets {name!r}, which is a shared collaborator "
                                 "injected by the container; remove it from the option file")
            kwargs[name] = value() if isinstance(value, providers.Provider) else value
        return cls(**kwargs)
    except Exception as e:
        e.add_note(f"(while building the config option {target})")
        raise


def _is_allocator_backend(tier: Any) -> bool:
    return callable(getattr(tier, "allocate", None))


def build_tiers(nodes: Mapping[str, Any] | DictConfig | None, **shared: Any) -> list:
    """Build the ordered storage tiers (``storage.backends``, in list order).

    The first tier must be able to allocate (the LocalCPUBackend): it becomes the
    ``allocator_backend`` offered to the tiers after it (unless one is passed in
    ``shared``). If a tier fails to build, the tiers already built are closed before the
    error propagates.

    Raises:
        ValueError: no tier; the first tier cannot allocate (e.g. ``[local_disk,local_cpu]``:
            local_cpu must come first); errors of :func:`build`.
    """
    nodes = _plain(nodes)
    if not nodes:
        raise ValueError("storage/backends is empty: give at least one tier")
    tiers: list = []
    allocator_backend = shared.pop("allocator_backend", None)
    try:
        for name, node in nodes.items():
            tier = build(node, allocator_backend=allocator_backend, **shared)
            tiers.append(tier)
            if allocator_backend is None and _is_allocator_backend(tier):
                allocator_backend = tier
            elif allocator_backend is None:
                raise ValueError(
                    f"storage tier {name!r} ({type(tier).__name__}) comes first in "
                    f"storage/backends=[{','.join(nodes)}] but cannot allocate: local_cpu must "
                    "be the first tier (the allocator backend the other tiers stage through)")
    except BaseException:
        for tier in reversed(tiers):
            _close(tier)
        raise
    return tiers


def find_allocator_backend(tiers: list) -> Any:
    """The allocator_backend of a tier list: the first tier that can allocate, or None."""
    return next((t for t in tiers if _is_allocator_backend(t)), None)


def _built(factory: Callable[..., Any], *args: Any, **kwargs: Any) -> Iterator[Any]:
    """Resource body: build once; closing is done by :func:`shutdown`, which knows owners."""
    yield factory(*args, **kwargs)


def _resource(factory: Callable[..., Any], *args: Any, **kwargs: Any) -> providers.Resource:
    return providers.Resource(_built, factory, *args, **kwargs)


def channel_agent_name(metadata: LMCacheMetadata) -> str:
    """A transfer-channel agent name unique on the network: host, pid and worker id."""
    return f"lmcache-{socket.gethostname()}-{os.getpid()}-w{metadata.worker_id}"


def channel_regions(allocator: Any) -> list:
    """The memory a transfer channel registers: the allocator's whole buffer."""
    return [allocator.buffer]


class SchedulerContainer(containers.DeclarativeContainer):
    """The scheduler process: the token database only (no allocator, no tiers)."""

    config = providers.Configuration()
    metadata = providers.Dependency(instance_of=LMCacheMetadata)
    token_database = providers.Singleton(build, config.token_database, metadata=metadata.provider)


class WorkerContainer(containers.DeclarativeContainer):
    """One worker process: the whole graph, one provider per slot."""

    config = providers.Configuration()
    metadata = providers.Dependency(instance_of=LMCacheMetadata)
    layout = providers.Dependency(instance_of=KVCacheLayout)  # from the serving engine

    token_database = providers.Singleton(build, config.token_database, metadata=metadata.provider)
    allocator = _resource(build, config.allocator, metadata=metadata.provider)
    policy = providers.Factory(build, config.storage.policy)  # one per tier that asks
    serde = providers.Singleton(build, config.serde, metadata=metadata.provider)
    local_disk_serde = providers.Singleton(build, config.local_disk_serde,
                                           metadata=metadata.provider)
    remote_connector = _resource(build, config.remote_connector, metadata=metadata.provider)
    # the one data path between instances (PD, P2P); null unless a feature needs it
    transfer_channel = _resource(
        build, config.transfer_channel,
        agent_name=providers.Callable(channel_agent_name, metadata).provider,
        regions=providers.Callable(channel_regions, allocator).provider,
    )
    backends = _resource(
        build_tiers, config.storage.backends,
        metadata=metadata.provider, allocator=allocator.provider, policy=policy.provider,
        serde=serde.provider, remote_connector=remote_connector.provider,
        local_disk_serde=local_disk_serde.provider,
        transfer_channel=transfer_channel.provider,
    )
    allocator_backend = providers.Callable(find_allocator_backend, backends)
    prefetcher = providers.Factory(Prefetcher)  # one per storage manager built
    storage_manager = _resource(StorageManager, backends=backends,
                                allocator_backend=allocator_backend, prefetcher=prefetcher)
    gpu_connector = _resource(build, config.gpu_connector, metadata=metadata.provider,
                              layout=layout.provider)
    engine = _resource(LMCacheEngine, metadata=metadata, token_database=token_database,
                       gpu_connector=gpu_connector, storage_manager=storage_manager)
    # the LMCacheWorker (controller=lmcache_worker): null without the cache controller
    lmcache_worker = _resource(build, config.controller, metadata=metadata.provider,
                               storage_manager=storage_manager.provider,
                               token_database=token_database.provider)
    # the LMCacheWorker (controller=lmcache_worker): null without the cache controller
    lmcache_worker = _resource(build, config.controller, metadata=metadata.provider,
                               storage_manager=storage_manager.provider,
                               token_database=token_database.provider)
    blender = _resource(
        build, config.blend,
        metadata=metadata.provider, engine=engine.provider, token_database=token_database.provider,
        gpu_connector=gpu_connector.provider, storage_manager=storage_manager.provider,
    )


def _checked_dict(cfg: DictConfig | Mapping[str, Any], metadata: LMCacheMetadata,
                  role: str) -> dict:
    """``cfg`` checked (its top-level keys before anything is resolved), then resolved."""
    if not isinstance(cfg, (DictConfig, Mapping)):
        raise TypeError(f"cfg must be a DictConfig or a mapping, got {type(cfg).__name__}")
    check_config(cfg, metadata, role=role)
    return dict(_plain(cfg))


def build_worker_container(cfg: DictConfig | Mapping[str, Any], metadata: LMCacheMetadata,
                           layout: KVCacheLayout) -> containers.DynamicContainer:
    """A :class:`WorkerContainer` instance for ``cfg`` (checked first); nothing is built
    until a provider is called (e.g. ``container.engine()``).

    Raises:
        ValueError: a cross-group invariant fails (:func:`lmcache.config.checks.check_config`).
    """
    plain = _checked_dict(cfg, metadata, "worker")
    container = WorkerContainer(metadata=metadata, layout=layout)
    container.config.from_dict(plain)
    return container


def build_scheduler_container(cfg: DictConfig | Mapping[str, Any],
                              metadata: LMCacheMetadata) -> containers.DynamicContainer:
    """A :class:`SchedulerContainer` instance for ``cfg``: only the token database
    (checked first).

    Raises:
        ValueError: chunk_size invalid or different from ``metadata``'s.
    """
    plain = _checked_dict(cfg, metadata, "scheduler")
    container = SchedulerContainer(metadata=metadata)
    container.config.from_dict(plain)
    return container


def _close(obj: Any) -> None:
    close = getattr(obj, "close", None)
    if not callable(close):
        return
    try:
        close()
    except Exception:  # noqa: BLE001 - shutdown goes on; the failure is logged
        logger.exception("closing %s failed", type(obj).__name__)


def shutdown(container: containers.Container) -> None:
    """Close everything ``container`` built, each object once, users before what they use.

    Ownership: the engine closes its storage manager, which closes its tiers; so only the
    top-most of engine / storage_manager / backends that was built is closed. Then the
    blender, the gpu connector, the remote connector and the allocator. A failing close is
    logged and the rest still close. Calling it again is a no-op until something is rebuilt.
    """
    def built(name: str) -> Any:
        provider = getattr(container, name, None)
        if isinstance(provider, providers.Resource) and provider.initialized:
            return provider()
        return None

    for name in ("lmcache_worker", "blender"):  # users of the engine and tiers first
        obj = built(name)
        if obj is not None:
            _close(obj)
    engine, manager, tiers = built("engine"), built("storage_manager"), built("backends")
    if engine is not None:
        _close(engine)
    elif manager is not None:
        _close(manager)
    elif tiers is not None:
        for tier in reversed(tiers):
            _close(tier)
    for name in ("gpu_connector", "remote_connector", "transfer_channel", "allocator"):
        obj = built(name)
        if obj is not None:
            _close(obj)
    container.shutdown_resources()


def build_mp_engine(cfg: DictConfig | Mapping[str, Any], metadata: LMCacheMetadata,
                    layout: KVCacheLayout, storage_manager: Any = None
                    ) -> tuple[LMCacheEngine, Any, Callable[[], None]]:
    """One engine of the MP server (``lmcache.mp_server``): ``(engine, storage_manager, close)``.

    The MP server runs one engine per (model, world size, worker, KV layout) over ONE storage
    manager: the first call builds the whole worker graph (``storage_manager`` None) and its
    ``close`` shuts it all down (:func:`shutdown`); later calls pass that manager, which their
    container uses instead of building tiers, and their ``close`` closes only their gpu
    connector (the owner closes the tiers, last).

    Raises:
        ValueError: as :func:`build_worker_container`.
    """
    container = build_worker_container(cfg, metadata, layout)
    if storage_manager is None:
        engine = container.engine()
        return engine, container.storage_manager(), lambda: shutdown(container)
    container.storage_manager.override(providers.Object(storage_manager))
    engine = container.engine()

    def close() -> None:
        if container.gpu_connector.initialized:
            _close(container.gpu_connector())
        container.shutdown_resources()

    return engine, storage_manager, close
