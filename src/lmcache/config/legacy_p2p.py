"""LMCache's cache-controller and P2P keys (``enable_controller``, ``enable_p2p`` and their
settings) as Hydra overrides: ``controller=lmcache_worker``, the ``p2p`` tier after the local
tiers, ``transfer_channel``, and the top-level keys of ``conf/config.yaml``. Used by
:mod:`lmcache.config.legacy`; required keys are checked as LMCache checks them, with a message
naming the key and its source.
"""

from __future__ import annotations

from typing import Any, Callable

from lmcache.config.overrides import override_value

# key → the feature that needs it (LMCache's __post_init__ checks)
CONTROLLER_REQUIRED = ("lmcache_instance_id", "controller_pull_url", "controller_reply_url",
                       "lmcache_worker_ports")
P2P_REQUIRED = ("p2p_host", "p2p_init_ports", "p2p_lookup_ports", "transfer_channel")
SETTINGS = ("lmcache_instance_id", "controller_pull_url", "controller_reply_url",
            "lmcache_worker_ports", "lmcache_worker_heartbeat_time",
            "lmcache_worker_heartbeat_delay_time", "p2p_host", "p2p_init_ports",
            "p2p_lookup_ports")


def p2p_tier_position(tiers: list[str]) -> int:
    """Where the p2p tier goes in the tier list: after the local tiers, before remote."""
    return sum(1 for t in tiers if t in ("local_cpu", "local_disk"))


def translate_controller(values: dict[str, Any], get: Callable[[str], Any],
                         src: Callable[[str], str],
                         option: Callable[[str, str, str, Any, str], str]
                         ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(group overrides, value overrides) for enable_controller / enable_p2p (both false:
    nothing).

    Raises:
        ValueError: enable_p2p without enable_controller, or a required key missing (named
            with its source, as LMCache requires it).
    """
    groups: list[tuple[str, str]] = []
    settings: list[tuple[str, str]] = []
    controller, p2p = get("enable_controller"), get("enable_p2p")
    if not controller and not p2p:
        return groups, settings
    if p2p and not controller:
        raise ValueError(f"LMCache config key enable_p2p=True (from {src('enable_p2p')}) needs "
                         "enable_controller=True (the controller tells peers who holds a chunk)")
    required = CONTROLLER_REQUIRED + (P2P_REQUIRED if p2p else ())
    for key in required:
        if values.get(key) in (None, [], ""):
            feature = "enable_p2p" if key in P2P_REQUIRED else "enable_controller"
            raise ValueError(f"LMCache config key {feature}=True (from {src(feature)}) needs "
                             f"{key}, which is not set")
    groups.append(("controller=" + option("controller", "lmcache_worker", "enable_controller",
                                          True, src("enable_controller")),
                   src("enable_controller")))
    if p2p:
        channel = values["transfer_channel"]
        groups.append(("transfer_channel=" + option("transfer_channel", channel,
                                                    "transfer_channel", channel,
                                                    src("transfer_channel")),
                       src("transfer_channel")))
    for key in SETTINGS:
        if values.get(key) is not None:
            settings.append((f"++{key}={override_value(values[key])}", src(key)))
    return groups, settings
