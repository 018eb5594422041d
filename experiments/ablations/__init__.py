"""Ablation recipes: sweep specs for experiments.sweep --spec=experiments/ablations/NAME.py, each with its trend."""
