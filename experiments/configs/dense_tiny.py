"""A few-million-parameter byte-level decoder that learns visibly on 2 CPU cores in minutes."""
from experiments.configs.base import get_base_config


def get_config():
  c = get_base_config()
  c.steps = 600
  c.batch_size = 16
  c.seq_len = 128
  c.learning_rate = 3e-3
  c.warmup_steps = 50
  c.eval_every = 100
  c.eval_batches = 4
  c.checkpoint_every = 200
  c.model.vocab_size = 384
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.ffn_dim = 384
  c.model.compute_dtype = 'float32'
  return c
