"""Tiny configs shared by the tests: a 2-layer byte-level decoder and dotted-key overrides."""
from experiments.configs import dense_tiny


def override(config, **overrides):
  """Sets dotted keys (`**{'mesh.data': 2}`) on a ConfigDict and returns it."""
  for key, value in overrides.items():
    target = config
    *path, last = key.split('.')
    for name in path:
      target = target[name]
    target[last] = value
  return config


def dense_config(**overrides):
  """dense_tiny cut to d_model 32, 2 layers, 8 x 32 tokens, no progress bar."""
  c = dense_tiny.get_config()
  c.batch_size, c.seq_len, c.progress = 8, 32, False
  c.model.d_model, c.model.num_layers, c.model.ffn_dim = 32, 2, 64
  return override(c, **overrides)
