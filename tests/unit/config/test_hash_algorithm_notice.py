"""An LMCache config read without pre_caching_hash_algorithm logs, at start, that LMCache's
default (builtin) differs from lmcache's (sha256_cbor)."""

import logging

from lmcache.config.legacy import overrides_from_legacy

NOTICE = "LMCache's default differs (builtin)"


def test_lmcache_config_without_hash_algorithm_logs_the_differing_default(tmp_path, caplog):
    path = tmp_path / "lmc.yaml"
    path.write_text("chunk_size: 128\n")
    with caplog.at_level(logging.INFO, logger="lmcache.config.legacy"):
        assert overrides_from_legacy(str(path), {}, {}) == ["++chunk_size=128"]
    assert NOTICE in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmcache.config.legacy"):
        overrides_from_legacy(None, {"LMCACHE_CHUNK_SIZE": "64"}, {})
    assert NOTICE in caplog.text


def test_no_notice_with_the_key_or_without_an_lmcache_config(caplog):
    with caplog.at_level(logging.INFO, logger="lmcache.config.legacy"):
        assert overrides_from_legacy(None, {"LMCACHE_PRE_CACHING_HASH_ALGORITHM": "builtin"}, {}) == [
            "++hash_algorithm=builtin"]
        overrides_from_legacy(None, {}, {"lmcache.chunk_size": 64})
        overrides_from_legacy(None, {}, {})
    assert NOTICE not in caplog.text
