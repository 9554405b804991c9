"""LoRA fine-tuning of a swapped model (LoLCATs' second stage, after attention transfer): low-rank adapters
(``peft``) on the decoder's linear layers, trained on next-token loss with the swapped attention (and its learned
feature maps) in place, every original weight frozen.

The adapters sit beside the frozen weights, unmerged, and belong to the swap: ``restore()`` (or a new swap) takes
them out again, so the model's own weights are never touched and ``restore_attention`` still gives bit-identical
logits. ``save_swap`` keeps them (``attnswap_lora.safetensors``) and ``load_swap`` puts them back.
"""

from __future__ import annotations

import math
import time
import warnings

import torch

from ..errors import AttnSwapError

ADAPTER = "attnswap"  # the peft adapter name
DEFAULT_STEPS, DEFAULT_LR, DEFAULT_RANK = 200, 1e-3, 16
DEFAULT_TARGETS = "all-linear"  # peft: every linear layer but the output head
WARMUP_STEPS = 10


def _peft():
    try:
        import peft
    except ImportError as e:
        raise AttnSwapError("LoRA fine-tuning needs peft: pip install peft (it comes with attnswap[eval])") from e
    return peft


class Adapters:
    """The LoRA layers put into a model: their settings, and how to take them out exactly (keeping their weights, so
    that the swap can put them back when it is activated again, e.g. after a ``with attnswap.swapped(...)`` block)."""

    def __init__(self, model, settings: dict):
        self.model, self.settings = model, dict(settings)
        self._frozen = {}  # parameter -> requires_grad before
        self._weights = None  # the adapters' weights while they are out of the model

    def attach(self) -> "Adapters":
        peft = _peft()
        s = self.settings
        config = peft.LoraConfig(r=s["rank"], lora_alpha=s["alpha"], target_modules=s["targets"], lora_dropout=0.0,
                                 bias="none")
        self._frozen = {p: p.requires_grad for p in self.model.parameters()}
        try:
            with warnings.catch_warnings():  # GPT-2's Conv1D layers: peft picks the right layout itself and says so
                warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
                peft.inject_adapter_in_model(config, self.model, adapter_name=ADAPTER)
        except ValueError as e:
            raise AttnSwapError(f"LoRA targets {s['targets']!r} do not fit this model: {e}") from e
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.owns(name))
        if self._weights is not None:
            self.load_state_dict(self._weights)
            self._weights = None
        return self

    @staticmethod
    def owns(name: str) -> bool:
        return ".lora_" in name

    def state_dict(self) -> dict:
        return {n: p.detach().float().cpu().contiguous() for n, p in self.model.named_parameters() if self.owns(n)}

    def load_state_dict(self, tensors: dict) -> None:
        own = {n: p for n, p in self.model.named_parameters() if self.owns(n)}
        if set(own) != set(tensors):
            missing, extra = sorted(set(own) - set(tensors))[:3], sorted(set(tensors) - set(own))[:3]
            raise AttnSwapError(f"saved LoRA weights do not match this model's adapters (missing {missing}, "
                                f"unexpected {extra})")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(tensors[n].to(p.device, p.dtype))

    def trainable(self) -> list:
        return [p for n, p in self.model.named_parameters() if self.owns(n)]

    def remove(self) -> None:
        """Put every wrapped layer's original module back and the original requires_grad flags (the adapters'
        weights are kept for ``attach``)."""
        from peft.tuners.lora import LoraLayer

        self._weights = self.state_dict()
        for name, module in list(self.model.named_modules()):
            if isinstance(module, LoraLayer):
                parent_name, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child,
                        module.get_base_layer())
        self.model.__dict__.pop("peft_config", None)
        for p, flag in self._frozen.items():
            p.requires_grad_(flag)
        self._frozen = {}


def _schedule(step: int, steps: int) -> float:
    """Linear warm-up over WARMUP_STEPS, then linear decay to zero."""
    return min(1.0, (step + 1) / WARMUP_STEPS) * max(0.0, 1.0 - step / steps)


def finetune(model, data, *, tokenizer=None, window: int = 512, max_windows: int | None = None,
             steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, rank: int = DEFAULT_RANK, alpha: float | None = None,
             targets=DEFAULT_TARGETS, progress: bool = False, seed: int = 0):
    """Train LoRA adapters of the swapped ``model`` on next-token loss; returns the swap's handle.

    ``data``: token ids or text (with ``tokenizer``), cut into windows of ``window`` tokens (all of them, or at most
    ``max_windows``), visited in turn, one window per step: the token budget is ``steps * window``. ``rank`` and
    ``alpha`` (default ``2 * rank``) are LoRA's; ``targets``: peft's ``target_modules`` (default every linear layer
    but the output head). ``handle.finetune`` reports the settings, the loss curve and the time.
    """
    from ..patches.swap import current_swap
    from .calibrate import calibration_windows

    handle = current_swap(model)
    if handle is None or not handle.active:
        raise AttnSwapError("finetune trains LoRA adapters for a swap: swap (or transfer) the model first")
    if getattr(handle, "adapters", None) is not None:
        raise AttnSwapError("this swap already has LoRA adapters; swap again to start from the raw swap")
    if not (isinstance(steps, int) and steps >= 1) or not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
        raise AttnSwapError(f"finetune needs steps >= 1 and lr > 0, got steps={steps!r}, lr={lr!r}")
    if not (isinstance(rank, int) and rank >= 1):
        raise AttnSwapError(f"rank must be a positive integer, got {rank!r}")
    windows = calibration_windows(data, tokenizer, window=window, max_windows=max_windows or 10**9)
    settings = {"rank": rank, "alpha": float(alpha if alpha is not None else 2 * rank),
                "targets": targets if isinstance(targets, str) else list(targets)}
    adapters = Adapters(model, settings).attach()
    handle.adapters = adapters
    params = adapters.trainable()
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(windows.shape[0], generator=generator)
    was_training = model.training
    losses, start = [], time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="LoRA fine-tuning", unit="step")
    model.train()
    try:
        with torch.enable_grad():
            for step in range(steps):
                ids = windows[order[step % len(order)]][None].to(device)
                loss = model(input_ids=ids, labels=ids).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        model.train(was_training)
        for p in params:
            p.grad = None
        if bar is not None:
            bar.close()
    tail = max(1, min(10, steps // 5))
    handle.finetune = {
        "method": "LoRA (peft) on next-token loss with the swap in place, original weights frozen, AdamW, linear "
                  "warm-up then decay, gradient norm clipped at 1", **settings, "steps": steps, "lr": lr,
        "window": window, "windows": int(windows.shape[0]), "tokens": steps * window,
        "trainable_parameters": sum(p.numel() for p in params), "loss_first": _mean_of(losses[:tail]),
        "loss_last": _mean_of(losses[-tail:]), "loss_curve": [round(x, 4) for x in losses],
        "seconds": time.perf_counter() - start,
    }
    return handle


def _mean_of(values) -> float:
    return sum(values) / len(values)
