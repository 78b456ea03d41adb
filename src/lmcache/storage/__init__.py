"""Storage: StorageManager, tiers (backends/), eviction policies (policy/)."""
