"""SmolLM2-135M shape: d 576, 30 layers, GQA 9/3, ffn 1536, vocab 49152, tied, RoPE base 1e5."""
from experiments.configs.base import get_base_config


def get_config():
  c = get_base_config()
  c.batch_size = 16
  c.seq_len = 2048
  c.model.vocab_size = 49152
  c.model.d_model = 576
  c.model.num_layers = 30
  c.model.num_heads = 9
  c.model.num_kv_heads = 3
  c.model.ffn_dim = 1536
  c.model.rope_base = 100000.0
  c.model.tie_embeddings = True
  return c
