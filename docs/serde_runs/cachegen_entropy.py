"""Coding headroom of CacheGen on the trained tiny Llama's KV (issue 10, item 4): bits per element
actually written vs the empirical entropies of the same quantized symbols under other models
(order-0 per 16-channel table = what the coder models; one table per channel; conditioned on
the previous token's symbol). Tables and scales are not counted in the entropies, so they are
optimistic bounds. Run from the repo root: python docs/serde_runs/cachegen_entropy.py"""
import numpy as np, torch, sys
sys.path.insert(0, "src")
from lmcache.experiments import kv_quality as kvq
from lmcache.experiments.trained_model import tiny_model_path
from lmcache.serde.cachegen import quantize, layer_bins, CacheGenSerde
from lmcache.serde import compressed
from transformers import AutoModelForCausalLM, AutoTokenizer
p = tiny_model_path("trained"); tok = AutoTokenizer.from_pretrained(p)
m = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
ids = kvq.load_passages(tok, "/usr/share/common-licenses", 2, 512)
def H(a):
    _, c = np.unique(a, return_counts=True); c = c / c.sum(); return float(-(c*np.log2(c)).sum())
for kb, vb, ek, ev in [((32,16),(32,16),10,2), ((16,8),(16,8),1,1)]:
    actual = h0 = h1 = hd = elems = 0
    for x in ids:
        kv = kvq.prefill_kv(m, x)[0].to(torch.bfloat16)
        for c in kv.split(256, dim=2):
            s = CacheGenSerde(key_bins=list(kb), value_bins=list(vb), key_early_layers=ek, value_early_layers=ev)
            from lmcache.memory.memory_obj import MemoryObj
            from lmcache.memory.memory_format import MemoryFormat
            obj = MemoryObj(c.contiguous().view(-1).view(torch.uint8).clone(), c.shape, c.dtype, MemoryFormat.KV_2LTD)
            actual += len(bytes(s.serialize(obj)[1])) * 8; elems += c.numel()
            L = c.shape[1]
            for k in range(2):
                bins = layer_bins(L, kb if k == 0 else vb, ek if k == 0 else ev)
                q, _ = quantize(c[k].float(), bins, per_channel=k == 0)
                q = q.numpy().astype(np.int32)
                for l in range(L):
                    for g in range(0, q.shape[2], 16):
                        blk = q[l, :, g:g+16]
                        h0 += H(blk.reshape(-1)) * blk.size
                        # per-channel table (16x more tables)
                        hd += sum(H(blk[:, j]) * blk.shape[0] for j in range(blk.shape[1]))
                        # context: previous token's symbol in the same channel
                        prev, cur = blk[:-1].reshape(-1), blk[1:].reshape(-1)
                        hc = 0
                        for v in np.unique(prev):
                            sel = cur[prev == v]; hc += H(sel) * sel.size
                        h1 += hc + H(blk[0]) * blk.shape[1]
    print(f"bins k{kb}/v{vb}: actual {actual/elems:.3f} bits/elem ({16*elems/actual:.2f}x); "
          f"order-0 per 16-ch table {h0/elems:.3f} ({16/(h0/elems):.2f}x); per-channel table "
          f"{hd/elems:.3f} ({16/(hd/elems):.2f}x); context prev-token {h1/elems:.3f} ({16/(h1/elems):.2f}x) [tables/scales not counted]")
