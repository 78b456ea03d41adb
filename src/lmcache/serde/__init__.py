"""Serde: turns MemoryObjs into remote wire bytes and back (options: naive)."""
