"""Fine-grained MoE: d 1024, 12 layers, 16 heads / 4 KV heads, 32 experts top-4 of ffn 704, vocab 32000 (928M).

Same total and active expert parameters as moe_8x2, split into four times as many, four times narrower experts.
"""
from experiments.configs.base import get_base_config


def get_config():
  c = get_base_config()
  c.batch_size = 8
  c.seq_len = 2048
  c.model.vocab_size = 32000
  c.model.d_model = 1024
  c.model.num_layers = 12
  c.model.num_heads = 16
  c.model.num_kv_heads = 4
  c.model.ffn_dim = 2816
  c.model.tie_embeddings = False
  c.model.compute_dtype = 'bfloat16'
  c.model.moe.num_experts = 32
  c.model.moe.top_k = 4
  c.model.moe.expert_ffn_dim = 704
  c.model.moe.dispatch = 'dropless'
  return c
