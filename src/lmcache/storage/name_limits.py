"""File-name limits of the tiers that keep one file per chunk, checked at start (issue 7.4).

The local disk tier and the ``fs://`` remote connector name each file after its chunk's key
string. Whether the file system can hold those names is known when the tier is built: the
longest key string of a configuration is fixed by the worker's LMCacheMetadata (model name,
world size, rank, dtype, layers) and the longest chunk hash (64 hex digits and a sign). A name
longer than the file system's ``NAME_MAX``, or a path longer than its ``PATH_MAX``
(``os.pathconf``; 255 and 4096 bytes on Linux), would make every write fail. So the tier
refuses to start, naming the directory, the length and the limit, instead of counting a write
error per chunk. (Request tags, ``lmcache.tag.*``, lengthen keys beyond this; a key too long
for the file system is then a counted refusal of that chunk.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from lmcache.keys import CacheEngineKey, LayerCacheEngineKey

if TYPE_CHECKING:
    from lmcache.metadata import LMCacheMetadata

LONGEST_HASH = -(16**64 - 1)  # "-" and 64 hex digits: the longest chunk hash a key holds
DEFAULT_NAME_MAX = 255
DEFAULT_PATH_MAX = 4096


def longest_keys(metadata: "LMCacheMetadata") -> list[str]:
    """The longest key strings (without request tags) this worker writes: a whole-chunk key
    and a layer key of the last layer, both with the longest chunk hash."""
    fields = (metadata.model_name, metadata.world_size, metadata.worker_id, LONGEST_HASH,
              metadata.kv_dtype)
    return [CacheEngineKey(*fields).to_string(),
            LayerCacheEngineKey(*fields, layer_id=max(metadata.num_layers - 1, 0)).to_string()]


def _existing(directory: str) -> str:
    """``directory`` or its nearest existing ancestor (for pathconf before it is mounted)."""
    path = os.path.abspath(directory)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def limits(directory: str) -> tuple[int, int]:
    """(NAME_MAX, PATH_MAX) in bytes of the file system holding ``directory`` (Linux defaults
    when the system does not tell)."""
    where = _existing(directory)
    out = []
    for name, default in (("PC_NAME_MAX", DEFAULT_NAME_MAX), ("PC_PATH_MAX", DEFAULT_PATH_MAX)):
        try:
            value = os.pathconf(where, name)
        except (OSError, ValueError):
            value = -1
        out.append(value if value > 0 else default)
    return out[0], out[1]


def check_file_names(directory: str, keys: Iterable[str], to_name: Callable[[str], str],
                     extra_names: Iterable[str], what: str) -> None:
    """Refuse a directory whose file system cannot hold the names the tier will create.

    Args:
        directory: where the files go.
        keys: the longest key strings (:func:`longest_keys`).
        to_name: key string → file name (raising ValueError is treated as too long).
        extra_names: other names the tier creates there (temporary files).
        what: the setting that chose the directory, for the message (e.g. ``"local_disk"``).

    Raises:
        ValueError: a name longer than NAME_MAX or a path of PATH_MAX bytes or more, naming
            the directory, the length, the limit and what to change.
    """
    name_max, path_max = limits(directory)
    keys = list(keys)
    names = list(extra_names)
    for key in keys:
        try:
            names.append(to_name(key))
        except ValueError as e:  # the encoder's own limit (255 bytes, Linux's NAME_MAX)
            raise ValueError(_too_long(what, directory, f"over {DEFAULT_NAME_MAX}", repr(key),
                                       min(name_max, DEFAULT_NAME_MAX))) from e
    longest = max(names, key=lambda n: len(n.encode("utf-8")))
    n = len(longest.encode("utf-8"))
    if n > name_max:
        raise ValueError(_too_long(what, directory, str(n), repr(longest), name_max))
    path = os.path.join(os.path.abspath(directory), longest)
    p = len(path.encode("utf-8"))
    if p >= path_max:
        raise ValueError(
            f"{what} {directory!r}: chunk file paths of this configuration are up to {p} bytes "
            f"(the directory, '/', a {n}-byte name), but its file system allows paths below "
            f"{path_max} bytes (PATH_MAX); use a directory with a shorter path")


def _too_long(what: str, directory: str, n: str, example: str, name_max: int) -> str:
    return (f"{what} {directory!r}: chunk file names of this configuration are {n} bytes long "
            f"(the longest for key {example}), but its file system allows {name_max} bytes per "
            f"name (NAME_MAX); use a shorter model name (e.g. vLLM's --served-model-name) or "
            f"another tier")
