"""Real models of three families, shipped on PyPI (``attnswap.default_model.MODELS``): SmolLM2-135M (llama),
Gemma 3 270M (gemma3: sliding-window and global layers, one KV head, head dim 256, q/k norms) and
Qwen2.5-Coder-0.5B-Instruct (qwen2: biased q/k/v projections, 14 query heads on 2 KV heads). The softmax swap is
exact on each, and a calibration fitted on one text lowers the perplexity of a swap on another.

The checks live here; each model has its own test file (``test_pypi_<model>.py``) that imports them with a
``real`` fixture of its model, so that ``pytest -n 2 --dist loadfile`` spreads the models over the workers."""

import importlib.util
import math

import pytest
import torch

import attnswap
from attnswap.default_model import MODELS, model_path
from attnswap.evals.corpus import calibration_text, default_text


def _installed(key):
    return all(importlib.util.find_spec(p) is not None for p in MODELS[key].packages)


def load(key):
    """(key, the model in fp32 with eager attention, its tokenizer); skips when its packages are not installed."""
    if not _installed(key):
        pytest.skip(f"{key} is not installed ({MODELS[key].install})")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(key)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    return key, model, AutoTokenizer.from_pretrained(path)


def _ppl(model, ids, window=256):
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.shape[1] - window + 1, window):
            chunk = ids[:, start:start + window]
            nll += model(input_ids=chunk, labels=chunk).loss.item() * (window - 1)
            count += window - 1
    return math.exp(nll / count)


def test_softmax_swap_is_exact(real):
    _, model, tok = real
    ids = tok(default_text(max_chars=3000), return_tensors="pt").input_ids[:, :300]
    with torch.no_grad():
        own = model(input_ids=ids).logits
        with attnswap.swapped(model, "softmax"):
            swapped = model(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, own)
    assert (swapped - own).abs().max().item() < 2e-3 * own.abs().max().item()


def test_calibration_fitted_on_other_text_lowers_entmax_perplexity(real):
    """Fit (and its held-back check) on the end of the offline corpus, score its start: calibrated entmax 1.5
    is far closer to the model's own than the raw swap, on each family."""
    name, model, tok = real
    scored = tok(default_text(max_chars=6000), return_tensors="pt").input_ids[:, :512]
    fit = tok(calibration_text(), return_tensors="pt").input_ids
    own = _ppl(model, scored)
    with attnswap.swapped(model, "entmax", alpha=1.5):
        raw = _ppl(model, scored)
    handle = attnswap.calibrate(model, "entmax", fit, window=256, max_windows=2, alpha=1.5)
    calibrated = _ppl(model, scored)
    handle.restore()
    assert handle.calibration["kept"] == "layer-wise", (name, handle.calibration["held_out_loss"])
    assert calibrated < raw and calibrated / own < 1 + 0.5 * (raw / own - 1), (name, own, raw, calibrated)
