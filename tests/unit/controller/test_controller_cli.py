"""``python -m lmcache.controller`` refuses bad keys and values with one line naming them and
exit status 2 (it used to accept ``+foo=1``, serve ``controller_port=70000`` without an HTTP
port, and dump tracebacks for ``controller_port=abc`` and an unknown ``controller_host``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmcache.controller.__main__ import KEYS, check_serve_config

GOOD = {"token_database": {}, "controller_index": {}, "controller_host": "127.0.0.1",
        "controller_port": 9000, "controller_monitor_ports": {"pull": 8300, "reply": 8400},
        "lmcache_worker_timeout": 300, "command_timeout_secs": 5.0, "chunk_size": 256,
        "save_unfull_chunk": False, "hash_algorithm": "sha256_cbor", "hash_seed": None}


def test_the_defaults_pass_and_every_key_is_known():
    assert set(GOOD) == set(KEYS)
    check_serve_config(GOOD)
    check_serve_config({**GOOD, "controller_host": "0.0.0.0", "controller_port": 65535})


@pytest.mark.parametrize("change,message", [
    ({"controller_port": "abc"}, "controller_port must be a port (1..65535), got 'abc'"),
    ({"controller_port": 70000}, "controller_port must be a port (1..65535), got 70000"),
    ({"controller_port": 0}, "got 0"),
    ({"controller_port": True}, "got True"),
    ({"controller_host": "256.1.1.1"}, "controller_host must be an address of this machine, "
                                       "got '256.1.1.1'"),
    ({"controller_prot": 9001}, "unknown key 'controller_prot'"),
    ({"foo": 1}, "unknown key 'foo': the controller reads token_database"),
])
def test_bad_keys_and_values_name_themselves(change, message):
    with pytest.raises(ValueError) as e:
        check_serve_config({**GOOD, **change})
    assert message in str(e.value)
    if "controller_prot" in change:
        assert "did you mean controller_port" in str(e.value)


def test_the_command_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "lmcache.controller", "controller_host=127.0.0.1",
                           "controller_port=abc"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert ("lmcache-controller: controller_port must be a port (1..65535), got 'abc'"
            in proc.stderr.splitlines())



def test_help_shows_the_controller_s_own_keys():
    """``--help`` renders this template (checked by hand: ``python -m lmcache.controller
    --help``; a subprocess here would cost ~4 s of imports)."""
    import importlib.resources

    from omegaconf import OmegaConf

    conf = importlib.resources.files("lmcache.conf") / "cache_controller" / "serve.yaml"
    help_ = OmegaConf.create(conf.read_text())["hydra"]["help"]
    assert help_["app_name"] == "lmcache-controller"
    assert help_["header"].startswith("lmcache-controller (python -m lmcache.controller)")
    assert "$CONFIG" in help_["template"] and "controller_index=valkey" in help_["footer"]
    assert "$APP_CONFIG_GROUPS" not in help_["template"]  # not every group of lmcache's tree
