"""Key file names of the disk tier (lmcache.storage.backends.disk_names): reversible, one
file name per key, never hidden."""

from __future__ import annotations

import pytest

from lmcache.storage.backends.disk_names import filename_to_key, key_to_filename


@pytest.mark.parametrize("key", [
    "meta-llama/Llama-3.1-8B@1@0@b8a960cfcc69e7a5@bfloat16",
    "a%2Fb/c%25@1@0@-1f@half@tag%x%2F",
    ".hidden/..@1@0@0@half",
    "%2E",
])
def test_key_file_names_round_trip_and_hold_no_slash(key):
    name = key_to_filename(key, ".kvc")
    assert "/" not in name and not name.startswith(".") and name.endswith(".kvc")
    assert filename_to_key(name, ".kvc") == key


def test_bad_file_names_are_rejected():
    with pytest.raises(ValueError, match="bad escape"):
        filename_to_key("a%41b.kvc", ".kvc")
    with pytest.raises(ValueError, match="does not end with"):
        filename_to_key("abc.tmp", ".kvc")
    with pytest.raises(ValueError, match="longer than 255"):
        key_to_filename("m" * 300)
    with pytest.raises(ValueError, match="empty or contains NUL"):
        key_to_filename("")
