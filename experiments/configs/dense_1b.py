"""Llama-style 1B: d 2048, 16 layers, 32 heads / 8 KV heads, ffn 5632, vocab 32000, untied head."""
from experiments.configs.base import get_base_config


def get_config():
  c = get_base_config()
  c.batch_size = 8
  c.seq_len = 2048
  c.model.vocab_size = 32000
  c.model.d_model = 2048
  c.model.num_layers = 16
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.ffn_dim = 5632
  c.model.tie_embeddings = False
  return c
