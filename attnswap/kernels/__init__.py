"""Triton kernels of attnswap, one module per kind, registered on their kinds when Triton is importable.

Shared pieces: ``tiles`` (score and visibility tiles, key/query bands, mask views), ``tuning`` (interpreter
detection, autotune configs). ``softmax``: ``flash_fwd`` (forward, o and lse), ``flash_decode`` (split-KV for
short queries), ``flash_bwd`` (backward). Each kind module (``softmax``, ``entmax``, ``topk``, ``linear``,
``taylor``, ``window_linear``) exposes ``kernel`` (the registry kernel) and ``supports`` (whether it can run given inputs, and
why not). If Triton is missing, nothing is registered and every kind runs its PyTorch reference.
"""

import importlib
import importlib.util

try:
    import triton  # noqa: F401
except ImportError:  # no Triton: register nothing
    triton = None

KERNEL_MODULES = ("softmax", "entmax", "topk", "linear", "taylor", "window_linear")


def _register() -> None:
    from .. import registry
    from .. import kinds  # noqa: F401  (the kinds must exist first)  # pyflakes: used for its side effect

    for name in KERNEL_MODULES:
        if importlib.util.find_spec(f"{__name__}.{name}") is None:
            continue
        module = importlib.import_module(f"{__name__}.{name}")
        if hasattr(module, "kernel") and hasattr(module, "supports"):
            kind = registry.get(name)
            kind.kernel, kind.kernel_supports = module.kernel, module.supports


if triton is not None:
    _register()
