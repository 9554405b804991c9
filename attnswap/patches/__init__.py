"""The transformers integration: the AttentionInterface backend, per-layer swaps, legacy class patches."""
