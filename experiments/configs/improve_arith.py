"""Offline self-improvement at CPU scale (Self-Improving Transformers, arXiv 2502.01612): a small byte-level decoder
trained on reversed additions of up to 3 digits labels 4-, 5- and 6-digit problems itself, keeps the labels its
majority vote agrees on, retrains, and its accuracy on longer additions rises round after round.

Measured on 2 busy CPU cores in 5 min 50 s (load ~7) to 8 min 52 s (load ~9): held-out accuracy (4-6 digits)
0.410 (base) -> 0.500 (round 1, accepted, gain CI [+0.043, +0.137]) -> 0.537 (round 2, accepted, [+0.003, +0.073])
-> 0.537 (round 3, rejected: [-0.030, +0.030]; its 6-digit self-labels were 10% right, which the vote does not catch).
"""
from experiments.configs.improve_base import get_improve_config


def get_config():
  c = get_improve_config()
  c.data.tokenizer = 'bytes'
  c.model.vocab_size = 384
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.ffn_dim = 256
  c.model.compute_dtype = 'float32'
  c.batch_size = 32
  c.seq_len = 48                # 'User: 654321+654321=\nAssistant: 1234567\n' + EOS is 41 bytes
  c.learning_rate = 3e-3
  c.warmup_steps = 50
  c.weight_decay = 0.0
  c.log_every = 100
  i = c.improve
  i.base_steps = 1000
  i.steps = 300
  i.pool_size = 300
  i.eval_examples = 100
  return c
