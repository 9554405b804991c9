"""Probe (not a feature): would a learned per-head gain on the attention output help calibrated entmax/sparsemax?

A sparse map averages over fewer values than softmax, so its output is larger (fewer vectors cancel), and one
score scale per head has to trade how wide a head's support is against how large its output comes out. A gain
per head (``out``) or per head and output coordinate (``channel``) on the swapped attention's output decouples
the two. Trained end to end with the per-head scales (and, with ``+qg``, the query gains of
``calibrate(..., query_gain=True)``) on the same distillation loss and steps as ``calibrate(..., end_to_end=True)``,
all gains 1 at the start, fed to the model by wrapping the transformers backend's ``run``.

    python benchmarks/probe_output_gain.py entmax 1.5 gemma3-270m scale,out,channel,out+qg 40 [0.05]  # lr
    python benchmarks/probe_output_gain.py entmax 1.5 tiny scale,out,out+qg 4                         # a smoke run

Model and text: ``probe_setup.py``.
Results: benchmarks/results/fidelity/*-output-gain-probe.log."""
import sys
from pathlib import Path

import torch

import attnswap.patches.interface as iface

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_setup import Probe  # noqa: E402

kind, alpha, model_key = sys.argv[1], float(sys.argv[2]), sys.argv[3]
modes = sys.argv[4].split(",")  # scale | out | channel, each optionally +qg
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 40
gain_lr = float(sys.argv[6]) if len(sys.argv) > 6 else 0.05

probe = Probe(model_key, kind, alpha)
gains = {}
orig_run = iface.run


def gain_run(kind_, options, query, key, value, vis, **kw):
    out, weights = orig_run(kind_, options, query, key, value, vis, **kw)
    log_gain = gains.get(kw["module"].layer_idx)
    if log_gain is not None:  # (Hq, 1) or (Hq, dv)
        out = (out.float() * log_gain.exp()[None, :, None, :]).to(out.dtype)
    return out, weights


iface.run = gain_run
for mode in modes:
    gains.clear()
    base = mode.split("+")[0]
    if base in ("out", "channel"):
        for i in probe.layer_wise:
            gains[i] = torch.zeros(probe.heads, 1 if base == "out" else probe.head_dim, requires_grad=True)
    probe.train(mode, list(gains.values()), gain_lr, steps, query_gain=mode.endswith("+qg"))
    if gains:
        spread = [float(g.detach().exp().mean()) for g in gains.values()]
        print(f"{mode}: mean output gain per layer {' '.join(f'{x:.2f}' for x in spread)}", flush=True)
iface.run = orig_run
