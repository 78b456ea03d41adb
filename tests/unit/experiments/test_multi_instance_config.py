"""The multi-instance experiment's document settings are refused with the key, the value and
what was expected (``documents.count=two`` used to say only "invalid literal for int()")."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmcache.experiments.lmcache_config import ExperimentConfigError
from lmcache.experiments.multi_instance import check_documents


def test_good_documents_pass():
    check_documents({"count": 2, "tokens": 2048}, 256)
    check_documents({"count": 1, "tokens": 512}, 256)


@pytest.mark.parametrize("docs,message", [
    ({"count": 0, "tokens": 2048}, "documents.count=0: expected an integer at least 1"),
    ({"count": "two", "tokens": 2048}, "documents.count='two': expected an integer at least 1"),
    ({"count": True, "tokens": 2048}, "documents.count=True"),
    ({"count": 2, "tokens": 511}, "documents.tokens=511: expected an integer at least 2 chunks (512)"),
    ({"count": 2, "tokens": 2.5}, "documents.tokens=2.5"),
])
def test_bad_documents_name_key_and_value(docs, message):
    with pytest.raises(ExperimentConfigError) as e:
        check_documents(docs, 256)
    assert message in str(e.value)


def test_a_config_error_is_one_line_and_exit_2_and_lands_in_the_log(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmcache.experiments.multi_instance",
                           "deployment=p2p", "documents.count=0", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr  # printed once (the logger writes only to the log file)
    assert out.count("documents.count=0: expected an integer at least 1") == 1, out
    assert "Traceback" not in out
    assert "documents.count=0" in (tmp_path / "multi_instance.log").read_text()


def test_the_table_fits_80_columns_when_piped(tmp_path, capsys):
    from omegaconf import OmegaConf

    from lmcache.experiments.console import Reporter
    from lmcache.experiments.multi_instance import report_results

    rows = [{"phase": p, "instance": "A", "query": q, "ttft_s": 1.2345, "text": "x",
             "cached_tokens": 4096, "lmcache_lookup_s": 0.001, "lmcache_retrieve_s": 0.0125}
            for p in ("A cold", "B no P2P", "B P2P", "A warm") for q in range(2)]
    status = report_results(OmegaConf.create({"output": {"csv": "m.csv"}}), rows,
                            {"B": {"p2p": 4096}}, tmp_path, Reporter(progress=False, width=80))
    out = capsys.readouterr().out
    assert status == 0 and "…" not in out, out
    assert "│ B no P2P │  1234.5 │ 1234-1234 │       1.0 │        12.5 │   8192 │      │" in out
    assert "same: greedy outputs equal the no-cache" in out
    assert "controller: up for the whole run" in out
    assert json.loads((tmp_path / "multi_instance.json").read_text())["controller_exit"] is None


def test_a_controller_that_died_during_the_run_fails_it(tmp_path, capsys):
    """Outputs equal (B fell back to recompute) but the controller exited: said, exit 4."""
    from omegaconf import OmegaConf

    from lmcache.experiments.console import Reporter
    from lmcache.experiments.multi_instance import report_results

    rows = [{"phase": p, "instance": "A", "query": 0, "ttft_s": 0.5, "text": "x",
             "cached_tokens": 0, "lmcache_lookup_s": 0.001, "lmcache_retrieve_s": 0.0}
            for p in ("A cold", "B no P2P", "B P2P", "A warm")]
    status = report_results(OmegaConf.create({"output": {"csv": "m.csv"}}), rows, {"B": {}},
                            tmp_path, Reporter(progress=False, width=200), controller_exit=-9)
    out = capsys.readouterr().out
    assert status == 4, out
    assert (f"ERROR: the controller exited with status -9 during the run (see "
            f"{tmp_path / 'controller.log'})") in out
    assert json.loads((tmp_path / "multi_instance.json").read_text())["controller_exit"] == -9
