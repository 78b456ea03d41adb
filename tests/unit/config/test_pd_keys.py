"""LMCache's disaggregated-prefill keys translate to the pd tier, the transfer channel and
save_unfull_chunk; what lmcache lacks is refused by name."""

from __future__ import annotations

import pytest

from lmcache.config import compose_config
from lmcache.config.checks import check_config
from lmcache.config.legacy import overrides_from_legacy


def _extra(**kv):
    return {f"lmcache.{k}": v for k, v in kv.items()}


def test_lmcache_pd_keys_compose_the_pd_tier():
    ov = overrides_from_legacy(None, {}, _extra(
        enable_pd=True, pd_role="sender", pd_buffer_size=1 << 29, pd_buffer_device="cpu",
        pd_peer_host="localhost", pd_peer_init_port=[7300], pd_peer_alloc_port=[7400],
        pd_proxy_host="localhost", pd_proxy_port=7500, transfer_channel="nixl",
        nixl_backends=["UCX"], pd_allocation_timeout_sec=2.5))
    cfg = compose_config(ov)
    check_config(cfg)
    pd = cfg.storage.backends.pd
    assert list(cfg.storage.backends) == ["pd"]
    assert (pd.pd_role, pd.pd_peer_host, list(pd.pd_peer_init_port), list(pd.pd_peer_alloc_port),
            pd.pd_allocation_timeout_sec) == ("sender", "localhost", [7300], [7400], 2.5)
    assert cfg.transfer_channel._target_ == "lmcache.transfer.nixl.NixlChannel"
    assert cfg.save_unfull_chunk is True and cfg.max_local_cpu_size == 0.5


def test_env_form_and_the_old_alias():
    ov = overrides_from_legacy(None, {"LMCACHE_ENABLE_XPYD": "True", "LMCACHE_PD_ROLE": "receiver",
                                      "LMCACHE_PD_PEER_INIT_PORT": "7300",
                                      "LMCACHE_PD_PEER_ALLOC_PORT": "7400"}, {})
    cfg = compose_config(ov)
    assert cfg.storage.backends.pd.pd_role == "receiver"
    assert list(cfg.storage.backends.pd.pd_peer_init_port) == [7300]


@pytest.mark.parametrize(("keys", "message"), [
    (dict(pd_role="both"), "LMCache's 'both' is not supported"),
    (dict(pd_role="receiver", pd_buffer_device="cuda"), "PD buffer is the CPU allocator"),
    (dict(pd_role="receiver", pd_peer_init_port=None), "needs the decoder's ports"),
    (dict(pd_role="receiver", local_disk="/tmp/x", max_local_disk_size=1), "pd tier comes alone"),
    (dict(pd_role="receiver", transfer_channel="py_socket"), "transfer_channel option 'py_socket'"),
    (dict(pd_role="receiver", nixl_backends=["LIBFABRIC"]), "UCX backend only"),
    (dict(pd_role="receiver", pd_bidirectional=True), "bidirectional mode"),
])
def test_what_lmcache_lacks_is_refused_by_name(keys, message):
    base = dict(enable_pd=True, pd_peer_init_port=7300, pd_peer_alloc_port=7400)
    with pytest.raises(ValueError, match=message):
        overrides_from_legacy(None, {}, _extra(**{**base, **keys}))


@pytest.mark.parametrize(("override", "message"), [
    ("storage/backends=[local_cpu,pd]", "the pd tier comes alone"),
    ("~transfer_channel", "needs a transfer channel"),
    ("save_unfull_chunk=false", "needs save_unfull_chunk=true"),
    ("gpu_connector=vllm_layerwise", "needs gpu_connector=vllm_paged"),
])
def test_pd_deployment_checks(override, message):
    cfg = compose_config(["deployment=pd_decoder", override])
    with pytest.raises(ValueError, match=message):
        check_config(cfg)
