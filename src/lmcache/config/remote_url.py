"""LMCache's ``remote_url``: its scheme picks the ``remote_connector`` option.

One table, :data:`REMOTE_SCHEMES`, maps a scheme to a connector option; it is used by the
LMCache translation (:mod:`lmcache.config.legacy`) and by the build-time checks
(:mod:`lmcache.config.checks`). The checks here are the cheap, shape-only ones (a known
scheme, a host where the connector needs one); each connector parses its url fully.
"""

from __future__ import annotations

import re

REMOTE_SCHEMES: dict[str, str] = {
    "valkey": "valkey",
    "redis": "valkey",
    "valkeys": "valkey",
    "rediss": "valkey",
    "valkey-cluster": "valkey_cluster",
    "redis-cluster": "valkey_cluster",
    "fs": "fs",
    "lm": "lm",
    "blackhole": "blackhole",
}
"""``remote_url`` scheme → ``remote_connector`` option: the one table of this mapping."""

URL_FORMS: dict[str, str] = {
    "valkey": "valkey://[user[:password]@]host:port[/db]",
    "valkey_cluster": "valkey-cluster://[user[:password]@]host1:port1,host2:port2,...",
    "lm": "lm://host:port",
    "fs": "fs:///path/to/dir",
    "blackhole": "blackhole://",
}
"""``remote_connector`` option → the url form its connector expects (for error messages)."""

_NEEDS_HOST = frozenset({"valkey", "valkey_cluster", "lm"})
_PASSWORD = re.compile(r"^([^:/@]*:)([^@]*)@")


def redact(url: str) -> str:
    """``url`` with the password of its ``user:password@`` part replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, hosts = rest.rpartition("@")
    if ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hosts}"


def _check_port(port: str, host: str, option: str) -> None:
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        what = f"port {port!r}" if port else "no port"
        raise ValueError(f"{host!r} has {what}, expected a port in 1..65535; expected "
                         f"{URL_FORMS[option]}")


def remote_connector_for(url: str) -> str:
    """The ``remote_connector`` option that serves ``url`` (e.g. ``"valkey"`` for
    ``redis://h:6379``).

    Raises:
        ValueError: ``url`` is not a string, has no ``scheme://``, an unknown scheme, no host
            where the connector needs one (``valkey://``), a port that is not a number in
            1..65535 (none at all for ``lm://``, which has no default port), or no path
            (``fs://``). The message
            says what was expected; the caller names the key, the url (:func:`redact`) and its
            source.
    """
    if not isinstance(url, str):
        raise ValueError(f"expected a url string, got {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme not in REMOTE_SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; known schemes: "
                         f"{', '.join(sorted(REMOTE_SCHEMES))}")
    option = REMOTE_SCHEMES[scheme]
    if option in _NEEDS_HOST:
        hosts = rest.rpartition("@")[2].split("/", 1)[0].split("?", 1)[0]
        for host in hosts.split(","):
            if host.startswith("["):
                name, _, after = host[1:].partition("]")
                has_port, port = after.startswith(":"), after[1:]
            else:
                name, has_port, port = host.partition(":")
            if not name.strip():
                raise ValueError(f"the url has no host; expected {URL_FORMS[option]}")
            if has_port or option == "lm":
                _check_port(port, host, option)
    elif option == "fs" and not rest:
        raise ValueError(f"the url has no directory; expected {URL_FORMS[option]}")
    return option
