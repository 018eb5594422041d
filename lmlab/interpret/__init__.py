"""Interpretability for lmlab models: capture and patch named intermediates, logit lens, direct logit attribution,
input attribution, attention and MoE routing views, and the HTML report (experiments.interpret runs them all)."""
