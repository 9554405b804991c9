"""The kinds' reference math in PyTorch, memory-bounded. Importing this registers the built-in kinds."""

from . import entmax, linear, softmax, taylor, topk, window_linear  # noqa: F401  (registration side effects)
