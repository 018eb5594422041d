"""Evaluation: perplexity and bits-per-byte of text under a model."""
