"""The committed trained tiny Llama: loads from its assets, learned the license texts."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from lmcache.experiments.trained_model import (
    ASSET_DIR, ensure_trained_model, has_assets, tiny_model_path)


def test_assets_complete_and_loss_dropped():
    assert has_assets()
    with open(ASSET_DIR / "loss_curve.csv") as f:
        rows = list(csv.DictReader(f))
    first, best = float(rows[0]["heldout_loss"]), min(float(r["heldout_loss"]) for r in rows)
    assert first > 8.0 and best < 5.5  # log(6335) = 8.75 at random init; learned well below
    meta = json.loads((ASSET_DIR / "train_meta.json").read_text())
    assert meta["best_heldout_loss"] == pytest.approx(best)
    assert (ASSET_DIR / "loss_curve.png").stat().st_size > 1000


def test_greedy_continuation_of_a_license_sentence(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_trained_model(tmp_path / "m")
    assert ensure_trained_model(tmp_path / "m") == path  # idempotent
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok("This program is free software; you can redistribute it and/or modify it under",
              return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).startswith(
        " the GNU General Public License")


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="tiny_model='big'"):
        tiny_model_path("big")
