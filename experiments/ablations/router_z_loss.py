"""Router z-loss (ST-MoE) on (weight 1e-3) and off: it keeps router logits small for numerical stability."""
from lmlab.sweep.grid import Spec


def get_spec() -> Spec:
  return Spec(config='experiments/configs/moe_tiny.py', grid={'model.moe.z_loss_weight': [0.0, 1e-3]}, seeds=3,
              trend='moe/z_loss (mean squared log-sum-exp of the router logits) ends clearly lower with the '
                    'z-loss on; eval loss is unchanged within the seeds\' standard error')
