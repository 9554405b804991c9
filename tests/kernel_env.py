"""Where the kernel tests run: on a GPU with larger shapes, else in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton) on small ones."""

import torch

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
S = 4 if CUDA else 1  # sequence-length multiplier on a GPU
