"""LoRA fine-tuning of a swapped model (LoLCATs' second stage, after attention transfer): low-rank adapters
(``peft``) on the decoder's linear layers, trained with the swapped attention in place (and, by default, the
swap's learned feature maps from attention transfer with them), every original weight frozen. The objective is
distillation from the model itself (the default: the KL divergence from the model's own next-token distribution,
with its own attention, to the swapped model's, seen through the teacher's top ``distill_top`` tokens at every
position and one bucket for the rest) or plain next-token loss on the text.

The adapters sit beside the frozen weights, unmerged, and belong to the swap: ``restore()`` (or a new swap) takes
them out again, so the model's own weights are never touched and ``restore_attention`` still gives bit-identical
logits. ``save_swap`` keeps them (``attnswap_lora.safetensors``) and ``load_swap`` puts them back.

Fine-tuning can also make a swap worse (a learning rate too high for a swap that starts close to the model moves
it away first), so a few windows are held back (``holdout``) and scored with the training objective before
training and at a few points during it; the adapters (and feature maps) of the best point are kept, and none at all
when no point beats the swap before fine-tuning. ``handle.finetune["held_out"]`` says which.
"""

from __future__ import annotations

import math
import time
import warnings

import torch

from ..errors import AttnSwapError
from ..progress import progress_bar
from ..registry import FEATURE_PROJ

ADAPTER = "attnswap"  # the peft adapter name
DEFAULT_STEPS, DEFAULT_RANK = 200, 16
# the learning rate when none is given: by how far the swap starts from the model (its distillation loss before
# training, nats per token). A hybrid that keeps the model's own attention over a window starts close (SmolLM2 0.07,
# Gemma 3 0.32) and only needs refining: a high rate first throws it off (Gemma 3: 1.36x -> 1.46x at 2e-3, 1.05x at
# 5e-4). Pure linear attention starts far (2.1) and needs the larger steps to recover.
FAR_LR, NEAR_LR, NEAR_LOSS = 2e-3, 5e-4, 1.0
DEFAULT_LR = None  # NEAR_LR below NEAR_LOSS, else FAR_LR (next-token objective: FAR_LR)
DEFAULT_TARGETS = "all-linear"  # peft: every linear layer but the output head
WARMUP_STEPS = 10
OBJECTIVES = ("distill", "next_token")
DEFAULT_OBJECTIVE, DEFAULT_TOP = "distill", 64
DEFAULT_HOLDOUT = 4  # windows held back to check the adapters on (never trained on)
CHECKS = 8  # held-back checks during training, evenly spaced, the last at the last step (and one before training)


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


def run_steps(step_loss, params: list, optimizer, steps: int, desc: str, progress: bool,
              clip: float | None = None, after_step=None) -> list[float]:
    """``steps`` optimizer steps on ``step_loss(step)`` (warm-up then linear decay, gradient norm clipped at
    ``clip`` when given), with a progress bar, calling ``after_step(step)`` after each; returns the loss of each
    step."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps))
    losses, bar = [], progress_bar(steps, desc, progress)
    try:
        with torch.enable_grad():
            for step in range(steps):
                loss = step_loss(step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                if after_step is not None:
                    after_step(step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        if bar is not None:
            bar.close()
    return losses


def teacher_targets(model, handle, windows, *, top: int, progress: bool = False) -> list:
    """For each window, the model's own (unswapped, no adapters) top-``top`` next-token log-probabilities and
    their token ids at every position, kept on the CPU (ids as int32): the distillation targets."""
    device = next(model.parameters()).device
    handle.restore()  # the model's own attention for the teacher pass; the same swap comes back after
    targets, bar = [], progress_bar(len(windows), "teacher targets", progress)
    try:
        with torch.no_grad():
            for window in windows:
                logp = model(input_ids=window[None].to(device), use_cache=False).logits[0].float().log_softmax(-1)
                values, ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
                targets.append((values.cpu(), ids.to(torch.int32).cpu()))
                if bar is not None:
                    bar.update(1)
    finally:
        handle._activate()
        if bar is not None:
            bar.close()
    return targets


def distill_loss(logits: torch.Tensor, target) -> torch.Tensor:
    """KL(teacher || student) of the two next-token distributions seen through the teacher's top tokens plus one
    bucket for all the others (exact when the teacher keeps every token), mean over positions: zero when the
    swapped model gives each kept token, and the rest together, the teacher's probability."""
    values, ids = target
    ids = ids.to(logits.device).long()
    logits = logits[0].float()
    # one pass over the vocabulary (and one softmax in backward): the rest bucket is what the kept tokens leave
    kept = logits.gather(-1, ids) - logits.logsumexp(-1, keepdim=True)
    rest_q = (-torch.expm1(kept.logsumexp(-1, keepdim=True))).clamp_min(torch.finfo(torch.float32).tiny)
    logq = torch.cat([kept, rest_q.log()], -1)
    logp = values.to(logits.device).float()
    rest = (-torch.expm1(logp.logsumexp(-1, keepdim=True))).clamp_min(0.0)  # the teacher's mass on other tokens
    p = torch.cat([logp.exp(), rest], -1)
    cross = torch.where(p > 0, p * logq, 0.0)  # no 0 * -inf where the teacher keeps every token
    return (torch.xlogy(p, p) - cross).sum(-1).mean()


def finetune(model, data, *, tokenizer=None, window: int = 512, max_windows: int | None = None,
             steps: int = DEFAULT_STEPS, lr: float | None = DEFAULT_LR, rank: int = DEFAULT_RANK,
             alpha: float | None = None, targets=DEFAULT_TARGETS, objective: str = DEFAULT_OBJECTIVE,
             distill_top: int = DEFAULT_TOP, feature_maps: bool = True, holdout: int = DEFAULT_HOLDOUT,
             progress: bool = False, seed: int = 0):
    """Train LoRA adapters of the swapped ``model``; returns the swap's handle.

    ``data``: token ids or text (with ``tokenizer``), cut into windows of ``window`` tokens (all of them, or at most
    ``max_windows``); the last ``holdout`` windows are held back, the others visited in a shuffled order, one window
    per step: the token budget is ``steps * window``.
    ``objective``: ``"distill"`` (default; the model with its own attention is the teacher: one forward per window
    before training, its top ``distill_top`` log-probabilities kept) or ``"next_token"``. ``rank`` and ``alpha``
    (default ``2 * rank``) are LoRA's; ``targets``: peft's ``target_modules`` (default every linear layer but the
    output head). ``feature_maps``: also train the swap's learned query/key maps (``attnswap.transfer``'s
    ``feature_proj``) end to end, in place (they stay options of the swap). ``holdout``: windows never trained on,
    scored with the objective before training and ``CHECKS`` times during it; the best point is kept (no adapters
    and the maps as they were, when fine-tuning never beat the swap as it was); 0: no check, the last step is kept.
    ``handle.finetune`` reports the settings, the loss curve, the held-back checks and the time.
    """
    from ..patches.swap import current_swap
    from .calibrate import calibration_windows

    handle = current_swap(model)
    if handle is None or not handle.active:
        raise AttnSwapError("finetune trains LoRA adapters for a swap: swap (or transfer) the model first")
    if getattr(handle, "adapters", None) is not None:
        raise AttnSwapError("this swap already has LoRA adapters; swap again to start from the raw swap")
    if not (isinstance(steps, int) and steps >= 1) or not (lr is None or isinstance(lr, (int, float))
                                                            and 0 < lr < math.inf):
        raise AttnSwapError(f"finetune needs steps >= 1 and lr > 0 (or None: by the starting loss), got "
                            f"steps={steps!r}, lr={lr!r}")
    if not (isinstance(rank, int) and rank >= 1):
        raise AttnSwapError(f"rank must be a positive integer, got {rank!r}")
    if objective not in OBJECTIVES:
        raise AttnSwapError(f"unknown fine-tuning objective {objective!r}; choose one of {list(OBJECTIVES)}")
    if objective == "distill" and not (isinstance(distill_top, int) and distill_top >= 2):
        raise AttnSwapError(f"distill_top must be an integer >= 2 (tokens kept per position), got {distill_top!r}")
    windows = calibration_windows(data, tokenizer, window=window, max_windows=max_windows or 10**9)
    windows, held = held_back(windows, holdout)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(windows.shape[0], generator=generator)[:steps]  # the windows the steps visit, in turn
    start = time.perf_counter()
    teacher = held_teacher = None
    if objective == "distill":
        teacher = teacher_targets(model, handle, torch.cat([windows[order], held]), top=distill_top,
                                  progress=progress)
        teacher, held_teacher = teacher[:len(order)], teacher[len(order):]
    settings = {"rank": rank, "alpha": float(alpha if alpha is not None else 2 * rank),
                "targets": targets if isinstance(targets, str) else list(targets)}
    adapters = Adapters(model, settings).attach()
    handle.adapters = adapters
    maps = swap_feature_maps(handle) if feature_maps else []
    params = adapters.trainable() + maps
    device = next(model.parameters()).device
    was_training = model.training

    def loss_of(ids, target):
        ids = ids[None].to(device)
        if target is None:
            return model(input_ids=ids, labels=ids).loss
        return distill_loss(model(input_ids=ids).logits, target)

    def step_loss(step):
        slot = step % len(order)
        return loss_of(windows[order[slot]], teacher[slot] if teacher is not None else None)

    check = BestPoint(model, adapters, maps, held, held_teacher, loss_of, steps)
    lr, lr_rule = _learning_rate(lr, teacher is None, check,
                                 lambda: loss_of(windows[order[0]], teacher[0] if teacher else None))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    try:
        losses = run_steps(step_loss, params, optimizer, steps, "LoRA fine-tuning", progress, clip=1.0,
                           after_step=check.after_step if check.active else None)
        kept = check.keep_best(handle)
    finally:
        model.train(was_training)
        for p in params:
            p.grad = None
        for p in maps:  # options of the swap again, not parameters
            p.requires_grad_(False)
    tail = max(1, min(10, steps // 5))
    loss_name = (f"KL from the model's own next-token distribution (its top {distill_top} tokens)"
                 if teacher is not None else "next-token cross-entropy")
    handle.finetune = {
        "method": f"LoRA (peft) with the swap in place, original weights frozen, on {loss_name}; AdamW, linear "
                  "warm-up then decay, gradient norm clipped at 1", **settings, "objective": objective,
        **({"distill_top": distill_top} if teacher is not None else {}), "steps": steps, "lr": lr, "lr_rule": lr_rule,
        "window": window, "windows": int(windows.shape[0]), "windows_used": len(order), "tokens": steps * window,
        "trainable_parameters": sum(p.numel() for p in params),
        "feature_map_parameters": sum(p.numel() for p in maps), "loss_first": _mean_of(losses[:tail]),
        "loss_last": _mean_of(losses[-tail:]), "loss_curve": [round(x, 4) for x in losses], "kept": kept,
        **({"held_out": check.report()} if check.active else {}), "seconds": time.perf_counter() - start,
    }
    return handle


def _learning_rate(lr, next_token: bool, check, first_window_loss) -> tuple[float, str]:
    """(the learning rate, why): the one given, else by the distillation loss before training (on the held-back
    windows, or the first training window without them): NEAR_LR below NEAR_LOSS, FAR_LR above."""
    if lr is not None:
        return float(lr), "given"
    if next_token:
        return FAR_LR, "default for the next-token objective"
    if check.active:
        start, where = check.checks[0][1], "held-back"
    else:
        with torch.no_grad():
            start, where = first_window_loss().item(), "first window's"
    near = start < NEAR_LOSS
    return (NEAR_LR if near else FAR_LR), (f"{where} distillation loss before training {start:.3f} "
                                           f"{'<' if near else '>='} {NEAR_LOSS}: the swap starts "
                                           f"{'close to' if near else 'far from'} the model")


def held_back(windows: torch.Tensor, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(windows to train on, the last ``holdout`` windows, held back)."""
    if not (isinstance(holdout, int) and holdout >= 0):
        raise AttnSwapError(f"holdout is a number of windows held back (0: no check), got {holdout!r}")
    if holdout and windows.shape[0] <= holdout:
        raise AttnSwapError(f"fine-tuning with {holdout} held-back windows needs at least {holdout + 1} windows of "
                            f"{windows.shape[1]} tokens, the text has {windows.shape[0]}: give more text, a smaller "
                            "window, or a smaller holdout (0: no held-back check)")
    return windows[:windows.shape[0] - holdout], windows[windows.shape[0] - holdout:]


class BestPoint:
    """The held-back check of a fine-tuning run: the objective on the held-back windows before training and at
    ``CHECKS`` evenly spaced steps; the adapters' and maps' values at the best point are kept."""

    def __init__(self, model, adapters, maps, held, held_teacher, loss_of, steps: int):
        self.model, self.adapters, self.maps, self.held, self.loss_of = model, adapters, maps, held, loss_of
        self.held_teacher = held_teacher or [None] * len(held)
        self.active = len(held) > 0
        self.at = {min(steps, math.ceil(steps * (i + 1) / CHECKS)) for i in range(CHECKS)}
        self.checks, self.best = [], None
        if self.active:
            self._score(0)

    def _score(self, step: int) -> None:
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            loss = _mean_of([self.loss_of(ids, t).item() for ids, t in zip(self.held, self.held_teacher)])
        self.model.train(was_training)
        self.checks.append((step, loss))
        if self.best is None or loss < self.best[1]:  # (adapter weights, None before training; map values)
            adapters = None if step == 0 else {n: t.clone() for n, t in self.adapters.state_dict().items()}
            self.best = (step, loss, (adapters, [m.detach().clone() for m in self.maps]))  # copies, not views

    def after_step(self, step: int) -> None:
        if step + 1 in self.at:
            self._score(step + 1)

    def keep_best(self, handle) -> bool:
        """Put the best point's values back (unless it is the last step); False when that is the swap before
        fine-tuning: the adapters are taken out and dropped."""
        if not self.active or self.best[0] == self.checks[-1][0]:
            return True
        adapters, maps = self.best[2]
        with torch.no_grad():
            for m, value in zip(self.maps, maps):
                m.copy_(value)
            if adapters is None:
                self.adapters.remove()
                handle.adapters = None
                return False
            self.adapters.load_state_dict(adapters)
        return True

    def report(self) -> dict:
        return {"windows": len(self.held), "tokens": int(self.held.numel()),
                "checks": [[s, x] for s, x in self.checks], "kept_step": self.best[0],
                "loss_before": self.checks[0][1], "loss_kept": self.best[1]}


def swap_feature_maps(handle) -> list:
    """The tensors of the swap's learned query/key maps (every layer's ``feature_proj``), made trainable."""
    tensors = {}
    for options in (handle.options, *handle.layer_options.values()):
        projection = options.get(FEATURE_PROJ)
        if projection is not None:
            for t in (projection.weight, projection.bias):
                tensors[id(t)] = t
    return [t.requires_grad_(True) for t in tensors.values()]


def _mean_of(values) -> float:
    return sum(values) / len(values)
