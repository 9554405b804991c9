"""Probe (not a feature): would a learned per-head null sink help calibrated entmax/sparsemax?

A null sink is one more always-visible score column per head whose value vector is zero (the ``sinks`` the kinds
already take, as gpt-oss's attention sinks), so a head can give part of its weight to nothing. Here it is trained
end to end together with the per-head score scales, on the same distillation loss and steps as
``calibrate(..., end_to_end=True)``, starting ``init`` below each head's median row maximum of the scaled scores
(a sparse map gives no gradient to a column outside its support, so it cannot start at -inf). The sinks are fed to
the swapped attention by wrapping the transformers backend's ``run``.

    python benchmarks/probe_null_sink.py entmax 1.5 smollm2-135m 1000,0.5,1.0,1.5 40   # 1000: no sink
    python benchmarks/probe_null_sink.py entmax 1.5 tiny 1000,1.0 4                     # a smoke run

Text: kjv.txt in the working folder, or $KJV_TEXT (``benchmarks/kjv_text.py`` makes it): fit on its last 30000 characters (4 windows of 512 tokens, 2 fitted,
2 held back), perplexity on the first 2048 tokens of the rest, as in the README's fidelity table.
Results: benchmarks/results/fidelity/smollm2-135m-null-sink-probe.log."""
import math
import os
import sys
import time

import torch

import attnswap
import attnswap.patches.interface as iface
from attnswap.adapt.calibrate import calibration_windows, split_windows
from attnswap.adapt.finetune import DEFAULT_TOP, distill_loss, run_steps, teacher_targets
from attnswap.registry import SCORE_SCALE, LearnedScale

torch.manual_seed(0)
kind, alpha, model_key = sys.argv[1], float(sys.argv[2]), sys.argv[3]
inits = [float(x) for x in sys.argv[4].split(",")]  # sink init offsets below each head's median row max
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 40
tiny = model_key == "tiny"

if tiny:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128)
    model = LlamaForCausalLM(cfg).eval()
    fit_ids = torch.randint(0, 128, (4, 64))
    score_ids = torch.randint(0, 128, (2, 64))
    window = 64
else:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from attnswap.default_model import model_path
    path = model_path(model_key)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    text = open(os.environ.get("KJV_TEXT", "kjv.txt")).read()
    fit_ids = calibration_windows(text[-30000:], tok, window=512, max_windows=4)
    score_ids = tok(text[:-30000][:20000], return_tensors="pt").input_ids[0, :2048].reshape(4, 512)
    window = 512
opts = {"alpha": alpha} if kind == "entmax" else {}


def ppl():
    nll = 0.0
    with torch.no_grad():
        for row in score_ids:
            nll += model(input_ids=row[None], labels=row[None], use_cache=False).loss.item()
    return math.exp(nll / score_ids.shape[0])


t0 = time.time()
own = ppl()
print(f"own {own:.4f}", flush=True)
handle = attnswap.calibrate(model, kind, fit_ids, window=window, **opts)
lw = {i: handle.options_of(i) for i in range(model.config.num_hidden_layers)}
print("kept", handle.calibration["kept"], handle.calibration.get("held_out_loss"), flush=True)
lw_ppl = ppl()
print(f"layer-wise {lw_ppl / own:.4f}x  ({time.time() - t0:.0f}s)", flush=True)
fit, held = split_windows(fit_ids, 0.5)

# per layer/head median of each row's max scaled score (last half of the queries), under the layer-wise scales
stats = {}
orig_run = iface.run


def stat_run(kind_, options, query, key, value, vis, **kw):
    from attnswap.dispatch import prepare_qk
    q, k, _ = prepare_qk(options, query, key)
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, 1)
    s = (q.float() @ kk.float().transpose(-1, -2)) * kw["scaling"]
    n = s.shape[-1]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    rmax = s[:, :, n // 2:].amax(-1)
    stats[kw["module"].layer_idx] = rmax.median(-1).values.mean(0)
    return orig_run(kind_, options, query, key, value, vis, **kw)


iface.run = stat_run
with torch.no_grad():
    model(input_ids=fit[:1], use_cache=False)
iface.run = orig_run

sinks = {}


def sink_run(kind_, options, query, key, value, vis, **kw):
    s = sinks.get(kw["module"].layer_idx)
    if s is not None:
        kw["sinks"] = s
    return orig_run(kind_, options, query, key, value, vis, **kw)


def held_loss():
    from attnswap.adapt.calibrate import next_token_loss
    return next_token_loss(model, held)


for init in inits:
    learned = {i: {SCORE_SCALE: LearnedScale(lw[i][SCORE_SCALE] if isinstance(lw[i].get(SCORE_SCALE), tuple)
                                             else (lw[i].get(SCORE_SCALE, 1.0),) * model.config.num_attention_heads)}
               for i in lw}
    sinks.clear()
    if init < 100:
        for i in lw:
            sinks[i] = (stats[i] - init).detach().clone().requires_grad_(True)
    h = attnswap.swap_attention(model, kind, layer_options=learned, **opts)
    iface.run = sink_run
    teacher = teacher_targets(model, h, fit, top=DEFAULT_TOP)
    print(f"init {init}: held-back loss at start {held_loss():.4f}; ppl at start {ppl() / own:.4f}x", flush=True)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [v[SCORE_SCALE].log_scale for v in learned.values()]
    groups = [{"params": params, "lr": 0.02}]
    if sinks:
        groups.append({"params": list(sinks.values()), "lr": 0.1})
    t1 = time.time()
    losses = run_steps(lambda st: distill_loss(model(input_ids=fit[st % fit.shape[0]][None], use_cache=False).logits,
                                               teacher[st % fit.shape[0]]),
                       params + list(sinks.values()), torch.optim.Adam(groups), steps, "e2e", False)
    with torch.no_grad():
        moved = [float((s - (stats[i] - init)).abs().mean()) for i, s in sinks.items()] if sinks else []
    print(f"init {init}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {time.time() - t1:.0f}s; held-back loss "
          f"{held_loss():.4f}; ppl {ppl() / own:.4f}x; mean |sink move| {sum(moved) / max(1, len(moved)):.3f}",
          flush=True)
    iface.run = orig_run
