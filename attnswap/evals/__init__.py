"""Evaluation: text corpora, perplexity, latency and attention statistics."""
