"""Odd values a user (or an attacker) can write, refused before anything is built, each error
naming the key, the value and what was expected: ports out of range or missing, timeouts
beyond what sockets and lock waits accept, a NUL in the disk path."""

from __future__ import annotations

import socket

import pytest

from lmcache.config import compose_config
from lmcache.config.checks import check_config, check_directory
from lmcache.config.legacy import overrides_from_legacy
from lmcache.config.remote_url import remote_connector_for


def test_a_timeout_beyond_one_day_overflows_sockets_so_it_is_refused():
    # What the limit protects against: Python refuses such a timeout at run time.
    with pytest.raises(OverflowError), socket.socket() as s:
        s.settimeout(1e20)
    cases = [("blocking_timeout_secs", 10**20, "expected at most 86400 s, got 1e+20"),
             ("lookup_timeout_ms", 86_400_001, "expected at most 86400000 ms, got 86400001")]
    for key, value, expected in cases:
        with pytest.raises(ValueError) as err:
            overrides_from_legacy(None, {}, {f"lmcache.{key}": value})
        assert str(err.value) == (f"LMCache config key {key}={value!r} (from kv_connector_extra_"
                                  f"config['lmcache.{key}']): {expected}")
        with pytest.raises(ValueError) as err:
            check_config(compose_config([f"{key}={value}"]), None, role="scheduler")
        assert str(err.value) == f"config key {key}={value!r}: {expected}"
    # The limits themselves pass.
    overrides = overrides_from_legacy(None, {"LMCACHE_BLOCKING_TIMEOUT_SECS": "86400",
                                             "LMCACHE_LOOKUP_TIMEOUT_MS": "86400000"}, {})
    assert overrides == ["++blocking_timeout_secs=86400", "++lookup_timeout_ms=86400000"]


@pytest.mark.parametrize("value", [0, -1, 65536, 70000])
def test_internal_api_server_port_start_is_a_tcp_port(value):
    with pytest.raises(ValueError) as err:
        overrides_from_legacy(None, {"LMCACHE_INTERNAL_API_SERVER_PORT_START": str(value)}, {})
    assert str(err.value) == (
        f"LMCache config key internal_api_server_port_start={str(value)!r} (from environment "
        f"variable LMCACHE_INTERNAL_API_SERVER_PORT_START): expected a TCP port in 1..65535, "
        f"got {value}")
    with pytest.raises(ValueError) as err:
        check_config(compose_config([f"internal_api_server_port_start={value}"]), None,
                     role="scheduler")
    assert str(err.value) == (f"config key internal_api_server_port_start={value}: expected a "
                              f"TCP port in 1..65535, got {value}")


BAD_PORTS = [
    ("lm://cache", "'cache' has no port", "lm://host:port"),
    ("lm://[::1]", "'[::1]' has no port", "lm://host:port"),
    ("lm://cache:abc", "'cache:abc' has port 'abc'", "lm://host:port"),
    ("lm://cache:0", "'cache:0' has port '0'", "lm://host:port"),
    ("lm://cache:-1", "'cache:-1' has port '-1'", "lm://host:port"),
    ("lm://cache:65536", "'cache:65536' has port '65536'", "lm://host:port"),
    ("valkey://cache:", "'cache:' has no port", "valkey://[user[:password]@]host:port[/db]"),
    ("redis://u:pw@cache:63 79/0", "'cache:63 79' has port '63 79'",
     "valkey://[user[:password]@]host:port[/db]"),
    ("valkey-cluster://h1:7000,h2:x", "'h2:x' has port 'x'",
     "valkey-cluster://[user[:password]@]host1:port1,host2:port2,..."),
]


@pytest.mark.parametrize(("url", "what", "form"), BAD_PORTS, ids=[b[0] for b in BAD_PORTS])
def test_remote_url_port_is_checked_before_anything_is_built(url, what, form):
    expected = f"{what}, expected a port in 1..65535; expected {form}"
    with pytest.raises(ValueError) as err:
        remote_connector_for(url)
    assert str(err.value) == expected
    with pytest.raises(ValueError) as err:
        overrides_from_legacy(None, {"LMCACHE_REMOTE_URL": url}, {})
    shown = url.replace(":pw@", ":***@")
    assert str(err.value) == (f"LMCache config key remote_url={shown!r} (from environment "
                              f"variable LMCACHE_REMOTE_URL): {expected}")


@pytest.mark.parametrize(("url", "option"), [
    ("lm://cache:65432", "lm"), ("LM://[::1]:1", "lm"), ("valkey://cache", "valkey"),
    ("rediss://u:p:w@cache:6380/0?ssl_cert_reqs=none", "valkey"),
    ("valkey://[::1]:6379", "valkey"), ("valkey-cluster://h1:7000,[::1]:7001", "valkey_cluster"),
])
def test_good_remote_urls_still_pass(url, option):
    assert remote_connector_for(url) == option


def test_local_disk_with_a_nul_character_is_refused_by_name(tmp_path):
    path = f"{tmp_path}/kv\x00x"
    with pytest.raises(ValueError) as err:
        check_directory(path)
    assert str(err.value) == (f"local_disk={path!r} contains a NUL character, expected a "
                              "directory path")
    overrides = overrides_from_legacy(None, {}, {"lmcache.local_disk": path,
                                                 "lmcache.max_local_disk_size": 1})
    with pytest.raises(ValueError) as err:
        check_config(compose_config(overrides), None, role="worker")
    assert str(err.value) == (f"local_disk={path!r} contains a NUL character, expected a "
                              "directory path")


def test_hash_seed_with_a_lone_surrogate_is_refused_by_name():
    # Before, the config passed and hashing raised "'utf-8' codec can't encode ..." naming no key.
    cfg = compose_config([])
    cfg.hash_seed = "seed\udc80"
    with pytest.raises(ValueError) as err:
        check_config(cfg, None, role="scheduler")
    assert str(err.value) == ("config key hash_seed='seed\\udc80': expected a string of Unicode "
                              "text; it holds a lone surrogate, which cannot be hashed (UTF-8)")
    cfg.hash_seed = "é-seed"
    check_config(cfg, None, role="scheduler")


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    # Before: a bare UnicodeDecodeError naming neither the file nor LMCACHE_CONFIG_FILE.
    path = tmp_path / "lmcache.yaml"
    path.write_bytes(b"chunk_size: 256\n\xff\xfe\x00")
    with pytest.raises(ValueError) as err:
        overrides_from_legacy(str(path), {"LMCACHE_CONFIG_FILE": str(path)}, {})
    assert str(err.value) == (f"LMCACHE_CONFIG_FILE={str(path)!r} is not UTF-8 text (invalid "
                              "start byte at byte 16), expected an LMCache YAML file")
