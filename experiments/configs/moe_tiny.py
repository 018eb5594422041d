"""dense_tiny with an 8-expert top-2 dropless MoE in every layer; learns visibly on 2 CPU cores in minutes."""
from experiments.configs import dense_tiny


def get_config():
  c = dense_tiny.get_config()
  c.steps = 400
  c.model.moe.num_experts = 8
  c.model.moe.top_k = 2
  c.model.moe.expert_ffn_dim = 128
  c.model.moe.dispatch = 'dropless'
  return c
