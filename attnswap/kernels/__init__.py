"""Triton kernels of attnswap, one module per family, registered on their kinds when Triton is importable.

``softmax``: ``flash_fwd`` (forward, returns o and lse), ``flash_decode`` (split-KV for short queries),
``flash_bwd`` (backward), ``softmax`` (the registry kernel, autograd and ``supports``). If Triton is missing,
nothing is registered and every kind runs its PyTorch reference.
"""

try:
    import triton  # noqa: F401
except ImportError:  # no Triton: register nothing
    triton = None

if triton is not None:
    from .. import registry
    from ..kinds import softmax as _softmax_kind  # noqa: F401  (the kind must exist first)
    from .softmax import kernel as _softmax_kernel, supports as _softmax_supports

    _kind = registry.get("softmax")
    _kind.kernel = _softmax_kernel
    _kind.kernel_supports = _softmax_supports
