"""Where the kernel tests run: on a GPU with larger shapes, else in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton) on small ones."""

import torch

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
S = 4 if CUDA else 1  # sequence-length multiplier on a GPU


def make_qkv(b, hq, hkv, n, m, d, dtype=torch.float32, seed=0, dv=None):
    """Random q (b, hq, n, d), k (b, hkv, m, d), v (b, hkv, m, dv or d) on DEV in ``dtype``, drawn in that order."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g)
    k = torch.randn(b, hkv, m, d, generator=g)
    v = torch.randn(b, hkv, m, dv or d, generator=g)
    return [t.to(DEV, dtype) for t in (q, k, v)]
