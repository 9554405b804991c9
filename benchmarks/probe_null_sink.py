"""Probe (not a feature): would a learned per-head null sink help calibrated entmax/sparsemax?

A null sink is one more always-visible score column per head whose value vector is zero (the ``sinks`` the kinds
already take, as gpt-oss's attention sinks), so a head can give part of its weight to nothing. Here it is trained
end to end together with the per-head score scales, on the same distillation loss and steps as
``calibrate(..., end_to_end=True)``, starting ``init`` below each head's median row maximum of the scaled scores
(a sparse map gives no gradient to a column outside its support, so it cannot start at -inf). The sinks are fed to
the swapped attention by wrapping the transformers backend's ``run``.

    python benchmarks/probe_null_sink.py entmax 1.5 smollm2-135m 1000,0.5,1.0,1.5 40   # 1000: no sink
    python benchmarks/probe_null_sink.py entmax 1.5 tiny 1000,1.0 4                     # a smoke run

Model and text: ``probe_setup.py``.
Results: benchmarks/results/fidelity/smollm2-135m-null-sink-probe.log."""
import sys
from pathlib import Path

import torch

import attnswap.patches.interface as iface
from attnswap.dispatch import prepare_qk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_setup import Probe  # noqa: E402

kind, alpha, model_key = sys.argv[1], float(sys.argv[2]), sys.argv[3]
inits = [float(x) for x in sys.argv[4].split(",")]  # sink init offsets below each head's median row max
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 40

probe = Probe(model_key, kind, alpha)
orig_run = iface.run
stats = {}  # per layer and head: the median of each row's max scaled score (last half of the queries)


def stat_run(kind_, options, query, key, value, vis, **kw):
    q, k, _ = prepare_qk(options, query, key)
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    s = (q.float() @ kk.float().transpose(-1, -2)) * kw["scaling"]
    n = s.shape[-1]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    stats[kw["module"].layer_idx] = s[:, :, n // 2:].amax(-1).median(-1).values.mean(0)
    return orig_run(kind_, options, query, key, value, vis, **kw)


iface.run = stat_run  # under the layer-wise scales the probe left in place
with torch.no_grad():
    probe.model(input_ids=probe.fit[:1], use_cache=False)
sinks = {}


def sink_run(kind_, options, query, key, value, vis, **kw):
    s = sinks.get(kw["module"].layer_idx)
    if s is not None:
        kw["sinks"] = s
    return orig_run(kind_, options, query, key, value, vis, **kw)


iface.run = sink_run
for init in inits:
    sinks.clear()
    if init < 100:
        for i in probe.layer_wise:
            sinks[i] = (stats[i] - init).detach().clone().requires_grad_(True)
    probe.train(f"init {init}", list(sinks.values()), 0.1, steps)
    if sinks:
        with torch.no_grad():
            moved = [float((s - (stats[i] - init)).abs().mean()) for i, s in sinks.items()]
        print(f"init {init}: mean |sink move| {sum(moved) / len(moved):.3f}", flush=True)
iface.run = orig_run
