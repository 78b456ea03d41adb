#!/usr/bin/env python3
"""Train the tiny Llama of lmcache's experiments on the local license texts.

Stages (default: all three, on CUDA when present, else CPU):

  prepare  tokenizer (the random tiny model's BPE, trained on /usr/share/common-licenses) +
           config.json into the asset dir; the corpus as token ids (train = first 90 % of
           each file, held-out = last 10 %) into --work/tokens.pt
  train    next-token training (AdamW, warmup + cosine); evaluates every --eval-every steps,
           keeps the best held-out checkpoint, writes model.safetensors (bf16, tied
           embeddings), loss_curve.csv and train_meta.json into --out; prints a greedy
           continuation of a license sentence
  plot     loss_curve.csv → loss_curve.png (matplotlib)

The committed model was made by (prepare and plot here, train on one H200):

  python scripts/train_tiny_model.py prepare --work .train
  python scripts/train_tiny_model.py train --work .train --out $OUT   # on the GPU machine
  python scripts/train_tiny_model.py plot
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from lmcache.experiments.trained_model import ASSET_DIR, TrainedShape, llama_config  # noqa: E402

PROMPT = "This program is free software; you can redistribute it and/or modify it under"


def prepare(work: Path, asset_dir: Path) -> None:
    import torch

    from lmcache.experiments.tiny_model import TinyModelSpec, build_tokenizer, corpus_files

    spec = TinyModelSpec()
    tok = build_tokenizer(spec)
    asset_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(asset_dir)
    cfg = llama_config(TrainedShape(), tok)
    cfg.save_pretrained(asset_dir)
    train, val = [], []
    for path in corpus_files(spec.corpus_dir):
        ids = tok(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
        cut = int(len(ids) * 0.9)
        train.extend(ids[:cut])
        val.extend(ids[cut:])
    work.mkdir(parents=True, exist_ok=True)
    torch.save({"train": torch.tensor(train, dtype=torch.int32),
                "val": torch.tensor(val, dtype=torch.int32)}, work / "tokens.pt")
    print(f"prepare: vocab {len(tok)}, train {len(train)} tokens, held-out {len(val)} tokens")


def _batches(data, seq, batch, gen, device):
    import torch

    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
    x = torch.stack([data[s:s + seq + 1] for s in starts.tolist()]).long().to(device)
    return x[:, :-1], x[:, 1:]


def _eval(model, data, seq, device):
    import torch

    model.eval()
    losses = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                         enabled=device.type == "cuda"):
        for s in range(0, data.numel() - seq - 1, seq):
            x = data[s:s + seq + 1].long().to(device)[None]
            out = model(x[:, :-1]).logits.float()
            losses.append(torch.nn.functional.cross_entropy(out[0], x[0, 1:]).item())
    model.train()
    return sum(losses) / len(losses)


def train(args) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(args.asset_dir)
    cfg = LlamaConfig.from_pretrained(args.asset_dir)
    data = torch.load(args.work / "tokens.pt")
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg).to(device).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    rows, best, best_state, t0 = [], math.inf, None, time.time()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / args.warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = _batches(data["train"], args.seq, args.batch, gen, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == 1:
            val = _eval(model, data["val"], args.seq, device)
            rows.append((step, round(loss.item(), 4), round(val, 4), round(time.time() - t0, 1)))
            print(f"step {step:5d} train {loss.item():.3f} held-out {val:.3f} lr {lr:.2e}",
                  flush=True)
            if val < best:
                best, best_step = val, step
                best_state = {k: v.detach().to("cpu", torch.bfloat16).clone()
                              for k, v in model.state_dict().items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in best_state.items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with open(out / "loss_curve.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "train_loss", "heldout_loss", "seconds"])
        w.writerows(rows)
    model.load_state_dict({k: v.float() for k, v in best_state.items()})
    model.eval()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        gen_ids = model.generate(ids, max_new_tokens=40, do_sample=False)
    sample = tok.decode(gen_ids[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"greedy: {PROMPT!r} -> {sample!r}")
    meta = {
        "command": " ".join(["python scripts/train_tiny_model.py"] + sys.argv[1:]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
        "weight_decay": args.weight_decay, "seed": args.seed,
        "best_step": best_step, "best_heldout_loss": round(best, 4),
        "first_heldout_loss": rows[0][2], "final_train_loss": rows[-1][1],
        "train_tokens": int(data["train"].numel()), "heldout_tokens": int(data["val"].numel()),
        "parameters": sum(v.numel() for v in state.values()),
        "seconds": round(time.time() - t0, 1), "greedy_prompt": PROMPT, "greedy_output": sample,
    }
    (out / "train_meta.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta, indent=2))


def plot(asset_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(asset_dir / "loss_curve.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [float(r["train_loss"]) for r in rows], label="train (batch)")
    ax.plot(steps, [float(r["heldout_loss"]) for r in rows], label="held-out (last 10 %)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("trained tiny Llama on /usr/share/common-licenses")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(asset_dir / "loss_curve.png", dpi=100)
    print(f"wrote {asset_dir / 'loss_curve.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("stage", nargs="?", default="all", choices=["prepare", "train", "plot", "all"])
    p.add_argument("--work", type=Path, default=REPO / ".train")
    p.add_argument("--asset-dir", type=Path, default=ASSET_DIR)
    p.add_argument("--out", type=Path, default=ASSET_DIR)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.stage in ("prepare", "all"):
        prepare(args.work, args.asset_dir)
    if args.stage in ("train", "all"):
        train(args)
    if args.stage in ("plot", "all"):
        plot(args.out)


if __name__ == "__main__":
    main()
