"""This machine's memory, read before anything is built: the CPU tier's buffer
(``max_local_cpu_size``) is checked against it by
:func:`lmcache.config.top_level_keys.check_values`."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def machine_memory() -> tuple[int | None, int | None, str]:
    """(total bytes, available bytes, where they were read) of this machine's memory: the
    smaller of ``MemTotal`` in /proc/meminfo and the cgroup's limit (``memory.max`` v2,
    ``memory.limit_in_bytes`` v1), and ``MemAvailable``; None where nothing could be read."""
    total = available = None
    where = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f
                    if line.split()[1:2] and line.split()[1].isdigit()}
        total, available = info.get("MemTotal"), info.get("MemAvailable")
        where.append("MemTotal in /proc/meminfo")
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (total or 1 << 62):
            total = int(text)
            where = [f"the cgroup limit {path}"]
        break
    return total, available, " and ".join(where)


def check_memory(size_gib: Any, key: str = "max_local_cpu_size") -> None:
    """Check that ``size_gib`` GiB of CPU memory (the allocator buffer, allocated whole at
    start) fits this machine (:func:`machine_memory`); a size above the memory available now
    only logs a warning.

    Raises:
        ValueError: "config key max_local_cpu_size=<v> GiB is more than this machine's memory
            (<total> GiB, MemTotal in /proc/meminfo)..."
    """
    if isinstance(size_gib, bool) or not isinstance(size_gib, (int, float)):
        return
    total, available, where = machine_memory()
    need = size_gib * 1024**3
    if total is not None and need > total:
        raise ValueError(
            f"config key {key}={size_gib!r} GiB is more than this machine's memory "
            f"({total / 1024**3:.1f} GiB, {where}); the CPU tier's buffer is allocated whole "
            f"at start: lower {key}")
    if available is not None and need > available:
        logger.warning("config key %s=%r GiB is more than the memory available now "
                       "(%.1f GiB, MemAvailable in /proc/meminfo)", key, size_gib,
                       available / 1024**3)
