"""A shared (always-on) expert on/off at equal active FLOPs (DeepSeekMoE): top-2 routed vs 1 shared + top-1 routed."""
from lmlab.sweep.grid import Spec


def get_spec() -> Spec:
  return Spec(config='experiments/configs/moe_tiny.py',
              zip=[{'model.moe.shared_experts': [0, 1], 'model.moe.top_k': [2, 1],
                    'model.moe.router': ['softmax', 'switch']}],  # top-1: Switch's weight p, not p / p
              overrides={'model.moe.num_experts': 8}, seeds=3,
              trend='the shared expert matches or slightly beats top-2 routing at equal active FLOPs and makes the '
                    'early loss curve smoother; expert load is less even with it (the shared expert takes the '
                    'common knowledge)')
