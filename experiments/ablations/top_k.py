"""Experts per token, top-k 1/2/4 of 8 experts of fixed width: active parameters and FLOPs grow with k.
Top-1 uses Switch's router (weight = the probability); k > 1 the renormalised softmax (Mixtral)."""
from lmlab.sweep.grid import Spec


def get_spec() -> Spec:
  return Spec(config='experiments/configs/moe_tiny.py',
              zip=[{'model.moe.top_k': [1, 2, 4], 'model.moe.router': ['switch', 'softmax', 'softmax']}],
              overrides={'model.moe.num_experts': 8}, seeds=3,
              trend='eval loss falls from k=1 to k=2 and a little further at k=4, while tokens/s drops as the '
                    'routed compute grows k-fold')
