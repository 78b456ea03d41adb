"""File names of keys in lmcache's disk tier: ``<encoded key><suffix>``, reversible.

``%`` → ``%25``, ``/`` → ``%2F`` and a leading ``.`` → ``%2E``, so a key string is one file
name that is never hidden and maps back to the key (:func:`filename_to_key`).
"""

from __future__ import annotations


def key_to_filename(key: str, suffix: str = "") -> str:
    """A file name for a key string, then ``suffix``: ``%`` → ``%25``, ``/`` → ``%2F``, and a
    leading ``.`` → ``%2E`` (reversible with :func:`filename_to_key`).

    Raises:
        ValueError: empty key, NUL in key, or a name longer than 255 bytes.
    """
    if not key or "\0" in key:
        raise ValueError(f"key {key!r} cannot be a file name (empty or contains NUL)")
    name = key.replace("%", "%25").replace("/", "%2F")
    if name.startswith("."):
        name = "%2E" + name[1:]
    name += suffix
    if len(name.encode("utf-8")) > 255:
        raise ValueError(f"file name for key {key!r} is longer than 255 bytes")
    return name


def filename_to_key(name: str, suffix: str = "") -> str:
    """Inverse of :func:`key_to_filename`. ValueError when ``name`` is not such a name."""
    if suffix:
        if not name.endswith(suffix):
            raise ValueError(f"file name {name!r} does not end with {suffix!r}")
        name = name[: -len(suffix)]
    if "/" in name or not name:
        raise ValueError(f"{name!r} is not an encoded key")
    out, i = [], 0
    table = {"%25": "%", "%2F": "/", "%2E": "."}
    while i < len(name):
        if name[i] == "%":
            code = name[i : i + 3]
            if code not in table or (code == "%2E" and i != 0):
                raise ValueError(f"bad escape {code!r} in file name {name!r}")
            out.append(table[code])
            i += 3
        else:
            out.append(name[i])
            i += 1
    return "".join(out)
