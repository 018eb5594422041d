"""Evaluation: log-likelihood scoring, metrics and statistics, task files (mc:, gen:, ppl:), paired comparison of
two models, reports, the lm-evaluation-harness adapter, and sliding-window perplexity of text."""
