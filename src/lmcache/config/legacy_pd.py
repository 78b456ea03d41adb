"""LMCache's disaggregated-prefill keys (``enable_pd``, ``pd_role``, ``pd_peer_*``,
``pd_buffer_*``, ...) as Hydra overrides of the ``pd`` tier. Used by
:mod:`lmcache.config.legacy`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

from lmcache.config.overrides import override_value

logger = logging.getLogger(__name__)
_GiB = 1 << 30


def translate_pd(values: dict[str, Any], src: Callable[[str], str],
                 option: Callable[..., str]) -> list[tuple[str, str]]:
    """LMCache's enable_pd and pd_* keys → storage/backends=[pd], transfer_channel and the pd
    tier's values (pd_buffer_size bytes → the allocator's max_local_cpu_size GiB). ``src(key)``
    names a key's source; ``option(group, name, key, value, source)`` checks that a config
    option is installed and returns its name.

    Raises:
        ValueError: pd_role not sender/receiver, a non-CPU pd_buffer_device, missing decoder
            ports (the message names the key and its source)."""
    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"LMCache config key {key}={values.get(key)!r} (from {src(key)}): {why}")

    role = values.get("pd_role")
    if role not in ("sender", "receiver"):
        raise bad("pd_role", "enable_pd needs pd_role sender (the prefiller) or receiver "
                             "(the decoder); LMCache's 'both' is not supported")
    device = values.get("pd_buffer_device") or "cpu"
    if device != "cpu":
        raise bad("pd_buffer_device", "lmcache's PD buffer is the CPU allocator: use cpu")
    channel = values.get("transfer_channel") or "nixl"
    out = [("storage/backends=[pd]", src("enable_pd")),
           ("transfer_channel=" + option("transfer_channel", channel, "transfer_channel",
                                          channel, src("transfer_channel")),
            src("transfer_channel")),
           ("++save_unfull_chunk=true", src("enable_pd")),
           (f"++storage.backends.pd.pd_role={role}", src("pd_role"))]
    for key in ("pd_peer_host", "pd_peer_init_port", "pd_peer_alloc_port",
                "pd_condition_poll_interval_sec"):
        if values.get(key) is not None:
            out.append((f"++storage.backends.pd.{key}={override_value(values[key])}", src(key)))
    for key in ("pd_peer_init_port", "pd_peer_alloc_port"):
        if values.get(key) is None:
            raise bad(key, "enable_pd needs the decoder's ports (pd_peer_init_port, "
                           "pd_peer_alloc_port) on both sides")
    timeout = values.get("pd_allocation_timeout_sec")
    if timeout is not None and timeout != math.inf:
        out.append((f"++storage.backends.pd.pd_allocation_timeout_sec={timeout!r}",
                    src("pd_allocation_timeout_sec")))
    elif timeout == math.inf:
        logger.info("pd_allocation_timeout_sec=inf (from %s): lmcache waits for a full decoder "
                    "buffer at most the pd tier's pd_allocation_timeout_sec (5 s), never forever",
                    src("pd_allocation_timeout_sec"))
    if values.get("pd_buffer_size") is not None:
        out.append((f"++max_local_cpu_size={values['pd_buffer_size'] / _GiB!r}",
                    src("pd_buffer_size")))
    if values.get("pd_proxy_host") is not None or values.get("pd_proxy_port") is not None:
        logger.info("pd_proxy_host/pd_proxy_port (from %s): lmcache's prefiller pushes the KV "
                    "before its step ends, so the proxy needs no notice; the keys are accepted",
                    src("pd_proxy_host"))
    return out
