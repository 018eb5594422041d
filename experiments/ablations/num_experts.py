"""Number of experts 1/4/8/16 at fixed active parameters: top-1 routing and a fixed expert width, so every token
runs the same matmuls and only the total parameter count grows with E. Top-1 is Switch's router (the expert output
weighted by its probability): renormalised, the weight would be 1 and the loss would never train the router."""
from lmlab.sweep.grid import Spec


def get_spec() -> Spec:
  return Spec(config='experiments/configs/moe_tiny.py', grid={'model.moe.num_experts': [1, 4, 8, 16]},
              overrides={'model.moe.top_k': 1, 'model.moe.router': 'switch'}, seeds=3,
              trend='eval loss falls as experts are added (E=1 is a dense model of the same active size), with '
                    'diminishing returns from 8 to 16; tokens/s stays nearly flat (dropless dispatch)')
