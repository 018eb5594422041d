"""Fine-grained MoE: moe_8x2's model with 32 experts top-4 of ffn 704 (928M).

Same total and active expert parameters as moe_8x2, split into four times as many, four times narrower experts.
"""
from experiments.configs import moe_8x2


def get_config():
  c = moe_8x2.get_config()
  c.model.moe.num_experts = 32
  c.model.moe.top_k = 4
  c.model.moe.expert_ffn_dim = 704
  return c
