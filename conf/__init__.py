"""lmcache's Hydra configuration tree, installed as the package ``lmcache.conf``.

Only YAML lives here: ``config.yaml`` (the primary config) and one folder per
slot (config group). Compose it with :func:`lmcache.config.compose_config` or
``@hydra.main(config_path="pkg://lmcache.conf", config_name="config")``.
"""
