"""lmcache's configuration: Hydra composition of ``lmcache.conf``, LMCache YAML/env
translation, and the cross-group checks run before the component graph is built.

Importing this package registers lmcache's OmegaConf resolvers
(``${lmcache.gib_to_bytes:...}``), which the config tree uses.
"""

from lmcache.config.compose import compose_config, list_groups, list_options, register_resolvers
from lmcache.config.legacy import REMOTE_SCHEMES, legacy_overrides, overrides_from_legacy

register_resolvers()

__all__ = [
    "REMOTE_SCHEMES",
    "compose_config",
    "list_groups",
    "legacy_overrides",
    "list_options",
    "overrides_from_legacy",
    "register_resolvers",
]
