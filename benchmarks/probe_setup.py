"""For calibration probes (``probe_null_sink.py``; the query- and output-gain probes became options of ``calibrate``):
the model and texts, the perplexity, the layer-wise start, and the end-to-end training of the per-head scales with
a probe's extra parameters, on the same distillation loss and steps as ``calibrate(..., end_to_end=True)``.

Text: kjv.txt in the working folder, or $KJV_TEXT (``benchmarks/kjv_text.py`` makes it): fit on its last 30000
characters (4 windows of 512 tokens, 2 fitted, 2 held back), perplexity on the first 2048 tokens of the rest, as
in the README's fidelity table. ``tiny``: a random 2-layer llama on random tokens (a smoke run)."""

from __future__ import annotations

import math
import os
import time

import torch

import attnswap
from attnswap.adapt.calibrate import calibration_windows, next_token_loss, split_windows
from attnswap.adapt.finetune import DEFAULT_TOP, distill_loss, run_steps, teacher_targets
from attnswap.adapt.scale_training import DEFAULT_LR as SCALE_LR
from attnswap.registry import SCORE_SCALE, LearnedScale


class Probe:
    """A model (``smollm2-135m``, ``gemma3-270m``, ... or ``tiny``) with its fit and scored windows, calibrated
    layer-wise to ``kind`` (printing its own perplexity and the layer-wise ratio)."""

    def __init__(self, model_key: str, kind: str, alpha: float):
        torch.manual_seed(0)
        if model_key == "tiny":
            from transformers import LlamaConfig, LlamaForCausalLM
            cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=128)
            self.model = LlamaForCausalLM(cfg).eval()
            fit_ids, self.score_ids, window = torch.randint(0, 128, (4, 64)), torch.randint(0, 128, (2, 64)), 64
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from attnswap.default_model import model_path
            path = model_path(model_key)
            self.model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
            tok = AutoTokenizer.from_pretrained(path)
            text = open(os.environ.get("KJV_TEXT", "kjv.txt")).read()
            fit_ids = calibration_windows(text[-30000:], tok, window=512, max_windows=4)
            self.score_ids = tok(text[:-30000][:20000], return_tensors="pt").input_ids[0, :2048].reshape(4, 512)
            window = 512
        self.kind, self.opts = kind, ({"alpha": alpha} if kind == "entmax" else {})
        cfg = self.model.config
        self.heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        t0 = time.time()
        self.own = self.ppl()
        print(f"own {self.own:.4f}", flush=True)
        handle = attnswap.calibrate(self.model, kind, fit_ids, window=window, **self.opts)
        self.layer_wise = {i: handle.options_of(i) for i in range(cfg.num_hidden_layers)}
        print("kept", handle.calibration["kept"], handle.calibration.get("held_out_loss"), flush=True)
        print(f"layer-wise {self.ppl() / self.own:.4f}x  ({time.time() - t0:.0f}s)", flush=True)
        self.fit, self.held = split_windows(fit_ids, 0.5)

    def ppl(self) -> float:
        nll = 0.0
        with torch.no_grad():
            for row in self.score_ids:
                nll += self.model(input_ids=row[None], labels=row[None], use_cache=False).loss.item()
        return math.exp(nll / self.score_ids.shape[0])

    def held_loss(self) -> float:
        return next_token_loss(self.model, self.held)

    def train(self, label: str, extra: list, extra_lr: float, steps: int) -> tuple[list[float], float]:
        """Swap to the layer-wise scales as ``LearnedScale``s, then train them with ``extra`` (the probe's own
        tensors, which its wrapped ``run`` applies; at ``extra_lr``) end to end for ``steps``; prints the
        held-back loss before and the losses, held-back loss and perplexity ratio after. Returns (losses, ratio)."""
        learned = {i: {SCORE_SCALE: LearnedScale(o[SCORE_SCALE] if isinstance(o.get(SCORE_SCALE), tuple)
                                                 else (o.get(SCORE_SCALE, 1.0),) * self.heads)}
                   for i, o in self.layer_wise.items()}
        handle = attnswap.swap_attention(self.model, self.kind, layer_options=learned, **self.opts)
        teacher = teacher_targets(self.model, handle, self.fit, top=DEFAULT_TOP)
        print(f"{label}: held-back loss at start {self.held_loss():.4f}", flush=True)
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = [v[SCORE_SCALE].log_scale for v in learned.values()]
        groups = [{"params": params, "lr": SCALE_LR}] + ([{"params": extra, "lr": extra_lr}] if extra else [])
        fit, model = self.fit, self.model
        t1 = time.time()
        losses = run_steps(lambda st: distill_loss(model(input_ids=fit[st % fit.shape[0]][None],
                                                         use_cache=False).logits, teacher[st % fit.shape[0]]),
                           params + extra, torch.optim.Adam(groups), steps, "e2e", False)
        ratio = self.ppl() / self.own
        print(f"{label}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {time.time() - t1:.0f}s; held-back loss "
              f"{self.held_loss():.4f}; ppl {ratio:.4f}x", flush=True)
        return losses, ratio
