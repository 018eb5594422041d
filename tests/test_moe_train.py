"""MoE through the real train step: expert-parallel training equals one device, the router bias moves, presets build."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import moe_8x2, moe_32x4, moe_tiny
from lmlab.models import Transformer, model_config_from_dict
from lmlab.train import build


def tiny_moe_config(**moe_overrides):
  c = moe_tiny.get_config()
  c.batch_size, c.seq_len, c.warmup_steps, c.learning_rate = 8, 16, 1, 1e-2
  c.model.d_model, c.model.num_layers, c.model.ffn_dim, c.model.moe.expert_ffn_dim = 32, 2, 64, 32
  c.progress = False
  for key, value in moe_overrides.items():
    c.model.moe[key] = value
  return c


def random_batch(config, seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 259, (config.batch_size, config.seq_len + 1)).astype(np.int32)
  segment_ids = np.ones((config.batch_size, config.seq_len), np.int32)
  segment_ids[:, -3:] = 0  # padded tails
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': segment_ids,
          'positions': np.tile(np.arange(config.seq_len, dtype=np.int32), (config.batch_size, 1)),
          'weights': (segment_ids != 0).astype(np.float32)}


def run_steps(config, num_steps, devices):
  parts = build.build(config, devices)
  with parts.context():
    state = parts.create_state()
    bias_0 = jax.device_get(state.model_state)
    history = []
    for i in range(num_steps):
      state, metrics = parts.train_step(state, jax.device_put(random_batch(config, i), jax.sharding.NamedSharding(
          parts.mesh, jax.sharding.PartitionSpec(('data', 'fsdp', 'expert')))))
      history.append(jax.device_get(metrics))
  return history, bias_0, jax.device_get(state)


@pytest.mark.parametrize('dispatch', ['dropless', 'capacity'])
def test_expert_parallel_training_equals_one_device_and_biases_move(dispatch):
  config = tiny_moe_config(router='sigmoid_bias', dispatch=dispatch, capacity_factor=4.0, bias_update_rate=0.05)
  one, bias_0, state_1 = run_steps(config, 3, jax.devices()[:1])
  config.mesh.data, config.mesh.expert = 2, 4
  many, _, state_n = run_steps(config, 3, jax.devices())
  for i, (a, b) in enumerate(zip(one, many)):
    np.testing.assert_allclose(b['loss'], a['loss'], rtol=1e-4, err_msg=f'step {i}')
    np.testing.assert_allclose(b['moe/load'], a['moe/load'], rtol=1e-4, atol=1e-6, err_msg=f'step {i}')
  for a, b in zip(jax.tree.leaves(state_1.params), jax.tree.leaves(state_n.params)):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)
  (bias_start,) = jax.tree.leaves(bias_0['router_state'])
  (bias_end,) = jax.tree.leaves(state_1.model_state['router_state'])
  assert bias_end.shape == (2, 8)
  moved = np.abs(bias_end - bias_start)
  assert moved.max() > 0 and moved.max() <= 3 * 0.05 + 1e-6, 'each step moves a bias by at most the rate'


@pytest.mark.parametrize('preset,total_params', [(moe_tiny, None), (moe_8x2, 928e6), (moe_32x4, 928e6)])
def test_moe_presets_build(preset, total_params):
  config = preset.get_config()
  model_config = model_config_from_dict(config.model.to_dict())
  assert model_config.is_moe
  shapes = jax.eval_shape(lambda: nn.unbox(Transformer(model_config).init(jax.random.PRNGKey(0),
                                                                           jnp.zeros((1, 8), jnp.int32))))
  n = sum(x.size for x in jax.tree.leaves(shapes['params']))
  if total_params:
    assert n == pytest.approx(total_params, rel=0.01), f'{preset.__name__}: {n / 1e6:.0f}M parameters'


def test_moe_losses_are_averaged_over_layers():
  """total_loss = token loss + the mean (not the sum) of the per-layer weighted balance + z losses."""
  config = tiny_moe_config(aux_loss_weight=0.5, z_loss_weight=0.1)
  config.model.num_layers = 3
  (metrics,), _, _ = run_steps(config, 1, jax.devices()[:1])
  per_layer = metrics['moe/loss']
  assert per_layer.shape == (3,) and np.ptp(per_layer) > 0
  np.testing.assert_allclose(metrics['total_loss'], metrics['loss'] + per_layer.mean(), rtol=1e-6)


def test_resume_is_bitwise_with_dropout_and_router_jitter(tmp_path):
  """A run resumed from its step-3 checkpoint draws the same dropout masks and jitter: identical losses after."""
  from lmlab.train import loop, metrics  # pylint: disable=g-import-not-at-top
  config = tiny_moe_config(jitter=0.2)
  config.model.dropout, config.steps, config.checkpoint_every, config.keep_checkpoints = 0.1, 6, 3, 2
  config.eval_every, config.log_every, config.data.prefetch = 0, 1, 0
  loop.run(config, str(tmp_path / 'straight'))
  config.restore = str(tmp_path / 'straight' / 'checkpoints' / '3')
  loop.run(config, str(tmp_path / 'resumed'))
  losses = lambda run: {r['step']: r['loss'] for r in metrics.read_rows(str(tmp_path / run / 'metrics.jsonl'))}
  straight, resumed = losses('straight'), losses('resumed')
  assert sorted(resumed) == [4, 5, 6] and all(resumed[s] == straight[s] for s in resumed), (straight, resumed)
  assert len(set(straight.values())) == 6
