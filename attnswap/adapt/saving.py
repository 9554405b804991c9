"""A swap saved beside the model: ``save_swap(model, dir)`` writes ``attnswap_swap.json`` (kind, options, layers,
per-layer options such as calibrated score scales, the calibration/transfer report and a fingerprint of the model)
and, after attention transfer, ``attnswap_swap.safetensors`` (the learned query/key maps), after LoRA
fine-tuning ``attnswap_lora.safetensors`` (the adapters); ``load_swap(model, dir)`` checks the fingerprint and
swaps the model the same way."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import AttnSwapError
from ..registry import FEATURE_PROJ, FeatureProjection
from .finetune import Adapters

FILENAME = "attnswap_swap.json"
TENSORS = "attnswap_swap.safetensors"  # learned feature maps (attention transfer)
LORA = "attnswap_lora.safetensors"  # LoRA adapters (attnswap.finetune)
FORMAT = 1
_CONFIG_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size")


def fingerprint(model) -> dict:
    """What identifies the model a swap was fitted on: its config's shape and a checksum of a few weights."""
    config = getattr(model, "config", None)
    shape = {k: getattr(config, k, None) for k in _CONFIG_KEYS}
    params = [p for n, p in sorted(model.named_parameters()) if not Adapters.owns(n)][:8]
    checksum = [float(p.detach().double().abs().sum()) for p in params]
    return {"config": shape, "weights": checksum}


def _same_weights(a, b) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-6) for x, y in zip(a, b))


def save_swap(model, directory) -> Path:
    """Write the model's current swap to ``directory/attnswap_swap.json``; returns the file's path."""
    from ..patches.swap import current_swap

    from .. import __version__

    handle = current_swap(model)
    if handle is None or not handle.active:
        raise AttnSwapError("save_swap: the model is not swapped; swap (or calibrate) it first")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    record = {
        "format": FORMAT, "attnswap": __version__, "kind": handle.kind.name,
        "options": _plain(handle.options), "layers": handle.layers, "impl": handle.impl,
        "layer_options": {str(i): _plain(o) for i, o in handle.layer_options.items()},
        "calibration": getattr(handle, "calibration", None), "model": fingerprint(model),
    }
    tensors = {}
    for i, options in handle.layer_options.items():
        projection = options.get(FEATURE_PROJ)
        if projection is not None:
            name = f"layers.{i}.{FEATURE_PROJ}"
            tensors[f"{name}.weight"] = projection.weight.detach().float().cpu().contiguous()
            tensors[f"{name}.bias"] = projection.bias.detach().float().cpu().contiguous()
            record["layer_options"][str(i)][FEATURE_PROJ] = {"tensors": name}
    record["transfer"] = getattr(handle, "transfer", None)
    from safetensors.torch import save_file

    for name, content in ((TENSORS, tensors), (LORA, handle.adapters.state_dict() if handle.adapters else None)):
        if content:
            save_file(content, str(path / name))
        elif (path / name).exists():
            (path / name).unlink()
    if handle.adapters is not None:
        record["lora"] = handle.adapters.settings
    if getattr(handle, "finetune", None) is not None:  # also when the held-back check dropped the adapters
        record["finetune"] = handle.finetune
    target = path / FILENAME
    target.write_text(json.dumps(record, indent=1))
    return target


def load_swap(model, directory, *, impl: str | None = None):
    """Swap ``model`` as saved in ``directory`` (by ``save_swap``); returns the handle."""
    from ..patches.swap import swap_attention

    target = Path(directory) / FILENAME
    if not target.is_file():
        raise AttnSwapError(f"load_swap: no saved swap in {str(directory)!r} (expected {FILENAME}); save one with "
                            "attnswap.save_swap(model, dir)")
    record = json.loads(target.read_text())
    if record.get("format") != FORMAT:
        raise AttnSwapError(f"load_swap: {target} has format {record.get('format')!r}; this attnswap reads {FORMAT}")
    saved, here = record["model"], fingerprint(model)
    if saved["config"] != here["config"]:
        diff = {k: (saved["config"].get(k), here["config"].get(k)) for k in _CONFIG_KEYS
                if saved["config"].get(k) != here["config"].get(k)}
        raise AttnSwapError(f"load_swap: the swap in {str(directory)!r} was saved from another model "
                            f"(saved vs this model: {diff})")
    if not _same_weights(saved["weights"], here["weights"]):
        raise AttnSwapError(f"load_swap: the swap in {str(directory)!r} was saved from a model with other weights "
                            "(same architecture); calibrate this model again")
    options = record["options"]
    per_layer = {int(i): dict(o) for i, o in record["layer_options"].items()}
    if any(FEATURE_PROJ in o for o in per_layer.values()):
        from safetensors.torch import load_file

        if not (Path(directory) / TENSORS).is_file():
            raise AttnSwapError(f"load_swap: {target} names learned feature maps but {TENSORS} is missing beside it")
        tensors = load_file(str(Path(directory) / TENSORS))
        device = next(model.parameters()).device
        for o in per_layer.values():
            if FEATURE_PROJ in o:
                name = o[FEATURE_PROJ]["tensors"]
                o[FEATURE_PROJ] = FeatureProjection(tensors[f"{name}.weight"].to(device),
                                                    tensors[f"{name}.bias"].to(device))
    handle = swap_attention(model, record["kind"], layers=record["layers"], impl=impl or record["impl"],
                            layer_options=per_layer, **options)
    if record.get("calibration") is not None:
        handle.calibration = record["calibration"]
    if record.get("transfer") is not None:
        handle.transfer = record["transfer"]
    if record.get("lora") is not None:
        if not (Path(directory) / LORA).is_file():
            raise AttnSwapError(f"load_swap: {target} names LoRA adapters but {LORA} is missing beside it")
        from safetensors.torch import load_file

        handle.adapters = Adapters(model, record["lora"]).attach()
        handle.adapters.load_state_dict(load_file(str(Path(directory) / LORA)))
    if record.get("finetune") is not None:
        handle.finetune = record["finetune"]
    return handle


def _plain(options: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else (v.tolist() if isinstance(v, torch.Tensor) else v))
            for k, v in options.items() if k != FEATURE_PROJ}
