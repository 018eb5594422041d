"""Training: loss goes down, sharded equals unsharded, accumulation is exact, errors are clear, runs resume."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny

from lmlab.train import build, loop, optim, step as step_lib

ROOT = tiny.ROOT


def tiny_config(**overrides):
  return tiny.dense_config(**{'warmup_steps': 2, 'learning_rate': 1e-2, **overrides})


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 259, (config.batch_size, config.seq_len + 1)).astype(np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'segment_ids': np.ones((config.batch_size, config.seq_len), np.int32),
          'positions': np.tile(np.arange(config.seq_len, dtype=np.int32), (config.batch_size, 1)),
          'weights': np.ones((config.batch_size, config.seq_len), np.float32)}


def run_steps(config, batches, devices=None):
  parts = build.build(config, devices)
  with parts.context():
    state = parts.create_state()
    losses = []
    for batch in batches:
      state, metrics = parts.train_step(state, jax.device_put(batch, jax.sharding.NamedSharding(
          parts.mesh, jax.sharding.PartitionSpec(('data', 'fsdp', 'expert')))))
      losses.append(float(metrics['loss']))
  return losses, jax.device_get(state.params)


def test_train_steps_lower_the_loss_on_a_fixed_batch():
  config = tiny_config()
  losses, _ = run_steps(config, [random_batch(config)] * 6, devices=jax.devices()[:1])
  assert losses[-1] < losses[0] - 0.5, losses
  assert losses[0] == pytest.approx(math.log(384), rel=0.05)  # untrained: near uniform over the vocab


def test_sharded_run_equals_single_device_run():
  config = tiny_config()
  batches = [random_batch(config, seed) for seed in range(3)]
  single, params_1 = run_steps(config, batches, devices=jax.devices()[:1])
  sharded, params_8 = run_steps(tiny_config(**{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}), batches)
  np.testing.assert_allclose(sharded, single, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), params_8, params_1)


def test_gradient_accumulation_equals_full_batch():
  config = tiny_config()
  batches = [random_batch(config, seed) for seed in range(2)]
  full, params_full = run_steps(config, batches, devices=jax.devices()[:4])
  accumulated, params_acc = run_steps(tiny_config(microbatches=2), batches, devices=jax.devices()[:4])
  np.testing.assert_allclose(accumulated, full, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_acc, params_full)


def test_gradient_accumulation_with_uneven_weights_equals_full_batch():
  """Microbatches with very different token counts: each token must weigh the same, not each microbatch."""
  config = tiny_config()
  batch = random_batch(config, seed=3)
  rng = np.random.default_rng(0)
  # The strided split puts even rows in microbatch 0: give them few (and fractional) weights, odd rows all.
  batch['weights'][0::2] = np.where(rng.random((4, config.seq_len)) < 0.1, 0.5, 0.0)
  # Independent expectation: the pooled weighted mean of per-token losses of the initial model, and its gradient.
  parts = build.build(tiny_config(microbatches=2), jax.devices()[:1])
  state = parts.create_state()
  params = state.params

  def per_token_nll(params):
    logits_BLV, _ = parts.model.apply({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'])
    return -jnp.take_along_axis(jax.nn.log_softmax(logits_BLV), batch['targets'][..., None], -1)[..., 0]

  w_BL = batch['weights']
  pooled, grads = jax.jit(jax.value_and_grad(lambda p: jnp.sum(per_token_nll(p) * w_BL) / jnp.sum(w_BL)))(params)
  nll_BL = np.asarray(jax.jit(per_token_nll)(params))
  mean_of_means = np.mean([(nll_BL[i::2] * w_BL[i::2]).sum() / w_BL[i::2].sum() for i in (0, 1)])
  assert abs(pooled - mean_of_means) > 1e-3, 'the batch must tell the two apart'
  _, metrics = parts.train_step(state, batch)  # the state is donated: params are not read after this
  assert float(metrics['loss']) == pytest.approx(float(pooled), abs=1e-5)
  assert float(metrics['total_loss']) == pytest.approx(float(pooled), abs=1e-5)
  assert float(metrics['grad_norm']) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-4)


def test_parameters_are_sharded_by_their_logical_names():
  parts = build.build(tiny_config(**{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}))
  specs = jax.tree.map(lambda s: tuple(s.spec), parts.shardings.params)
  attn = specs['layers']['block_0']['attn']
  assert attn['query']['kernel'] == (None, 'fsdp', 'tensor', None)
  assert attn['out']['kernel'] == (None, 'tensor', None, 'fsdp')
  assert specs['layers']['block_0']['mlp']['down']['kernel'] == (None, 'tensor', 'fsdp')
  assert specs['embed']['embedding'] == ('tensor', 'fsdp')
  assert specs['final_norm']['scale'] == ('fsdp',)


@pytest.mark.parametrize('overrides, message', [
    ({'mesh.data': 3}, 'does not divide the 8 devices'),
    ({'mesh.data': 2, 'mesh.fsdp': 2}, 'uses 4 of the 8 devices'),
    ({'batch_size': 12}, 'batch_size=12 is not divisible by the data-parallel size 8'),
])
def test_mesh_and_batch_errors_name_the_numbers(overrides, message):
  with pytest.raises(ValueError, match=message):
    build.build(tiny_config(**overrides))


def test_weight_decay_mask_skips_norms_biases_and_embeddings():
  params = {'embed': {'embedding': 0}, 'final_norm': {'scale': 0},
            'layers': {'block_0': {'attn': {'query': {'kernel': 0, 'bias': 0}}}}}
  mask = optim.decay_mask(params)
  assert mask == {'embed': {'embedding': False}, 'final_norm': {'scale': False},
                  'layers': {'block_0': {'attn': {'query': {'kernel': True, 'bias': False}}}}}
  assert optim.decay_mask(params, decay_embeddings=True)['embed']['embedding'] is True


def test_eval_summary_formulas():
  sums = {'nll_sum': 20.0, 'tokens': 10.0, 'correct': 4.0, 'bytes': 40.0, 'text_nll_sum': 18.0}
  out = step_lib.summarize_eval(sums)
  assert out['eval_loss'] == 2.0
  assert out['eval_perplexity'] == pytest.approx(math.exp(2.0))
  assert out['eval_bits_per_byte'] == pytest.approx(18.0 / (40.0 * math.log(2)))  # text targets' nats only (no EOS)
  assert out['eval_accuracy'] == 0.4


def test_z_loss_adds_mean_squared_logsumexp():
  logits = jnp.array([[[0.0, math.log(3.0)]]])
  nll, z, correct = step_lib.losses.token_cross_entropy(logits, jnp.array([[1]]), jnp.array([[1.0]]))
  assert float(nll) == pytest.approx(math.log(4.0) - math.log(3.0))
  assert float(z) == pytest.approx(math.log(4.0) ** 2)
  assert float(correct) == 1.0


def test_non_finite_loss_stops_the_run(tmp_path):
  config = tiny_config(steps=20, learning_rate=1e12, grad_clip=0.0, eval_every=0, checkpoint_every=0, log_every=1)
  with pytest.raises(FloatingPointError, match='loss is (nan|inf) at step'):
    loop.run(config, str(tmp_path))


def test_checkpoint_written_and_resumed(tmp_path, capsys):
  workdir = str(tmp_path)
  loop.run(tiny_config(steps=4, checkpoint_every=2, eval_every=4, eval_batches=1, log_every=1), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  assert 'starting from scratch' in capsys.readouterr().out
  summary = loop.run(tiny_config(steps=6, checkpoint_every=2, eval_every=6, eval_batches=1, log_every=1), workdir)
  assert 'resumed from step 4' in capsys.readouterr().out
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3, 4, 5, 6]
  assert summary['step'] == 6
  for name in ('summary.json', 'loss.png', 'config.json'):
    assert os.path.exists(os.path.join(workdir, name))
  assert any(name.startswith('events') for name in os.listdir(os.path.join(workdir, 'tensorboard')))


@pytest.mark.parametrize('flag, message', [('--config.no_such_key=1', 'no_such_key'),
                                           ('--config.steps=many', 'steps')])
def test_config_errors_exit_2_with_one_line(flag, message, tmp_path):
  result = subprocess.run([sys.executable, '-m', 'experiments.train', flag, f'--workdir={tmp_path}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'PYTHONPATH': ROOT})
  assert result.returncode == 2, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and message in lines[0], result.stderr


def test_expert_load_matrix_orders_layers_numerically():
  from lmlab.train import metrics  # pylint: disable=g-import-not-at-top
  row = {f'moe/load/layer{i}': [i, 1 - i] for i in (10, 2, 0, 1)} | {'loss': 1.0}
  load = metrics.expert_load(row)
  assert load[:, 0].tolist() == [0, 1, 2, 10]
  assert metrics.expert_load({'loss': 1.0}) is None


def test_metrics_truncate_after_drops_later_and_cut_short_rows(tmp_path):
  from lmlab.train import metrics  # pylint: disable=g-import-not-at-top
  writer = metrics.MetricsWriter(str(tmp_path))
  for step in (1, 2, 3, 4):
    writer.write(step, {'loss': float(step)})
  with open(writer.path, 'a') as f:
    f.write('{"step": 5, "lo')  # a row cut short by a kill
  assert writer.truncate_after(2) == 3
  writer.write(3, {'loss': 0.5})
  writer.close()
  assert [(r['step'], r['loss']) for r in metrics.read_rows(writer.path)] == [(1, 1.0), (2, 2.0), (3, 0.5)]
