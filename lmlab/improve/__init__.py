"""The self-improvement loop: generate, score, select, train, evaluate and gate, as resumable stages (loop.py)."""
