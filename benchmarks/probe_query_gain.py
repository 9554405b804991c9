"""Probe (not a feature): would a learned per-frequency query gain help calibrated entmax/sparsemax?

The end-to-end stage of ``calibrate`` trains one score scale per query head. Here each head also trains a gain per
rotary frequency pair of its queries (both coordinates of a pair share it, so it commutes with the rotation: the
same as scaling the query before RoPE; for a model without RoPE, a gain per coordinate pair): ``head_dim / 2``
numbers per head, all 1 at the start, so the per-head scale is the special case of equal gains. It can reshape a
head's score distribution (weigh position-like, low-frequency pairs against content pairs), which one temperature
cannot. Trained with the scales on the same distillation loss and steps as ``calibrate(..., end_to_end=True)``.
The gains are fed to the swapped attention by wrapping the transformers backend's ``run``.

    python benchmarks/probe_query_gain.py entmax 1.5 smollm2-135m scale,gain 40 [0.02]  # steps, the gains' lr
    python benchmarks/probe_query_gain.py entmax 1.5 tiny scale,gain 4                   # a smoke run

Model and text: ``probe_setup.py``.
Results: benchmarks/results/fidelity/*-query-gain-probe.log.
"""
import sys
from pathlib import Path

import torch

import attnswap.patches.interface as iface

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_setup import Probe  # noqa: E402

kind, alpha, model_key = sys.argv[1], float(sys.argv[2]), sys.argv[3]
modes = sys.argv[4].split(",")  # scale: the scales alone; gain: scales and per-frequency query gains
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 40
gain_lr = float(sys.argv[6]) if len(sys.argv) > 6 else 0.02

probe = Probe(model_key, kind, alpha)
gains = {}
orig_run = iface.run


def gain_run(kind_, options, query, key, value, vis, **kw):
    log_gain = gains.get(kw["module"].layer_idx)
    if log_gain is not None:
        g = torch.exp(torch.cat([log_gain, log_gain], -1))  # (heads, head_dim): rotate-half pairs share a gain
        query = query * g[None, :, None, :].to(query.dtype)
    return orig_run(kind_, options, query, key, value, vis, **kw)


iface.run = gain_run
for mode in modes:
    gains.clear()
    if mode == "gain":
        for i in probe.layer_wise:
            gains[i] = torch.zeros(probe.heads, probe.head_dim // 2, requires_grad=True)
    probe.train(mode, list(gains.values()), gain_lr, steps)
    if gains:
        spread = [float(g.detach().exp().std()) for g in gains.values()]
        print(f"{mode}: mean gain std per layer {sum(spread) / len(spread):.3f}", flush=True)
iface.run = orig_run
