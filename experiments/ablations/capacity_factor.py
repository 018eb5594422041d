"""Capacity factor 1.0/1.25/2.0 with capacity (einsum) dispatch: the share of dropped token assignments and its cost."""
from lmlab.sweep.grid import Spec


def get_spec() -> Spec:
  return Spec(config='experiments/configs/moe_tiny.py', grid={'model.moe.capacity_factor': [1.0, 1.25, 2.0]},
              overrides={'model.moe.dispatch': 'capacity'}, seeds=3,
              trend='moe/dropped_fraction falls steeply with the capacity factor (highest at 1.0, near zero at '
                    '2.0) and eval loss improves slightly as fewer tokens skip their experts')
