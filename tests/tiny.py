"""Tiny configs shared by the tests: a 2-layer byte-level decoder and dotted-key overrides."""
import os

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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24  # steps of the subprocess runs


def train_flags(checkpoint_every: int) -> list[str]:
  """`experiments.train` flags for a 24-step run of the tiny decoder, every step logged."""
  return ['--config.model.d_model=32', '--config.model.num_layers=2', '--config.model.ffn_dim=64',
          '--config.seq_len=32', '--config.batch_size=8', f'--config.steps={STEPS}', '--config.log_every=1',
          f'--config.checkpoint_every={checkpoint_every}', '--config.eval_every=12', '--config.eval_batches=1',
          '--config.progress=False']


def child_env(tmp_path_factory, devices: int) -> dict:
  """A subprocess's environment: `devices` CPU devices (not conftest's eight), one compilation cache per session."""
  cache = tmp_path_factory.getbasetemp() / 'jax_cache'
  return {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': str(cache),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
