"""The vocabulary-chunked loss equals the plain one on materialised logits: values, first-index argmax, gradients,
whole train and eval steps (tied and untied heads, one device and a 2x2x2 mesh), with less memory."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

from lmlab.models import ModelConfig
from lmlab.train import build, losses

B, L, D, V = 2, 6, 8, 40
TOL = 1e-6  # of the reference's largest magnitude: float32 sums of the same terms in another order


def close(got, want):
  want = np.asarray(want, np.float64)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=TOL * max(np.abs(want).max(), 1.0))


def example(seed=0):
  kx, kw, kt = jax.random.split(jax.random.key(seed), 3)
  weights_BL = jnp.ones((B, L)).at[0, -2:].set(0.0).at[1, 0].set(0.5)  # padding (0) and a fractional weight
  return (jax.random.normal(kx, (B, L, D)), jax.random.normal(kw, (D, V)), jax.random.randint(kt, (B, L), 0, V),
          weights_BL)


def objective(stats_fn, targets_BL, weights_BL, z_loss=0.1):
  """(x_BLD, w_DV) -> (nll + z_loss * z, the three sums): gradients flow through the nll and the z-loss."""
  def f(x_BLD, w_DV):
    sums = losses.token_sums(stats_fn(x_BLD, w_DV), targets_BL, weights_BL)
    return sums[0] + z_loss * sums[1], sums
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize('chunk', [8, 12])  # divides V = 40 (5 chunks) and does not (4 chunks, 8 padded columns)
def test_values_and_gradients_equal_the_plain_loss(chunk):
  x_BLD, w_DV, targets_BL, weights_BL = example()
  plain = objective(lambda x, w: losses.logit_stats(jnp.einsum('BLD,DV->BLV', x, w), targets_BL), targets_BL,
                    weights_BL)
  chunked = objective(lambda x, w: losses.chunked_logit_stats(x, w, targets_BL, chunk), targets_BL, weights_BL)
  (want, want_sums), want_grads = plain(x_BLD, w_DV)
  (got, got_sums), got_grads = chunked(x_BLD, w_DV)
  close(got, want)
  for g, w in zip(got_sums, want_sums):
    close(g, w)
  assert 0 < float(want_sums[2]) < float(jnp.sum(weights_BL)), 'some targets are the argmax, not all'
  for g, w in zip(got_grads, want_grads):  # d/d hidden states, d/d unembedding
    close(g, w)
  assert float(jnp.abs(got_grads[0][0, -2:]).max()) == 0.0  # padding contributes nothing


def test_argmax_is_the_first_maximum_across_chunks():
  """Small integer logits tie everywhere: the chunked argmax must still be jnp.argmax's first maximal id."""
  kx, kw = jax.random.split(jax.random.key(3))
  x_BLD = jax.random.randint(kx, (B, L, 2), -1, 2).astype(jnp.float32)
  w_DV = jax.random.randint(kw, (2, V), -1, 2).astype(jnp.float32)
  logits_BLV = jnp.einsum('BLD,DV->BLV', x_BLD, w_DV)
  _, _, want_BL = losses.logit_stats(logits_BLV, jnp.zeros((B, L), jnp.int32))
  assert int(jnp.sum(logits_BLV == jnp.max(logits_BLV, -1, keepdims=True))) > 2 * B * L, 'the example must tie'
  for chunk in (7, 8):
    _, _, got_BL = jax.jit(losses.chunked_logit_stats, static_argnums=3)(x_BLD, w_DV, jnp.zeros((B, L), jnp.int32),
                                                                          chunk)
    np.testing.assert_array_equal(got_BL, want_BL)


def test_chunked_loss_holds_less_memory():
  """XLA's temporaries for value and gradients: the plain loss keeps [B, L, V] float32 logits and their gradient, the
  chunked one a few [B, L, chunk] arrays (here 1/16 of the vocabulary)."""
  x_BLD, w_DV = jnp.zeros((4, 128, 32)), jnp.zeros((32, 8192))
  targets_BL, weights_BL = jnp.zeros((4, 128), jnp.int32), jnp.ones((4, 128))
  temp = lambda stats_fn: objective(stats_fn, targets_BL, weights_BL).lower(x_BLD, w_DV).compile(
  ).memory_analysis().temp_size_in_bytes
  plain = temp(lambda x, w: losses.logit_stats(jnp.einsum('BLD,DV->BLV', x, w), targets_BL))
  chunked = temp(lambda x, w: losses.chunked_logit_stats(x, w, targets_BL, 512))
  logits_bytes = 4 * 128 * 8192 * 4
  assert plain >= 2 * logits_bytes and chunked < logits_bytes / 3, (plain, chunked)


def run(parts, host_state, batches):
  """Losses and final params of train steps from host_state, and the eval step's sums on the first batch."""
  with parts.context():
    state = jax.device_put(host_state, parts.shardings)
    eval_sums = jax.device_get(parts.jit_eval_step()(state.params, state.model_state, batches[0]))
    metrics = []
    for batch in batches:
      state, step_metrics = parts.train_step(state, batch)
      metrics.append(jax.device_get(step_metrics))
  return metrics, jax.device_get(state.params), eval_sums


def batch(config, seed):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, config.model.vocab_size, (config.batch_size, config.seq_len + 1)).astype(np.int32)
  shape = (config.batch_size, config.seq_len)
  weights = np.where(rng.random(shape) < 0.2, 0.0, 1.0).astype(np.float32)  # padding and EOS-like targets
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': np.ones(shape, np.int32),
          'positions': np.tile(np.arange(config.seq_len, dtype=np.int32), (config.batch_size, 1)),
          'weights': weights}


@pytest.mark.parametrize('mesh, tied, chunk', [
    ({}, True, 96),                                                  # one device, tied embedding, 4 chunks
    ({'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}, False, 100),  # vocab over tensor, untied, 4 padded chunks
])
def test_train_and_eval_steps_equal_the_plain_loss(mesh, tied, chunk):
  devices = None if mesh else jax.devices()[:1]
  config = lambda chunk: tiny.dense_config(**{'model.loss_vocab_chunk': chunk, 'model.tie_embeddings': tied,
                                              'z_loss': 1e-2, 'learning_rate': 1e-3, 'warmup_steps': 1, **mesh})
  batches = [batch(config(0), seed) for seed in range(2)]
  plain, chunked = build.build(config(0), devices), build.build(config(chunk), devices)
  with plain.context():
    host_state = jax.device_get(plain.create_state())  # one initialisation for both (the steps donate theirs)
  want_metrics, want_params, want_eval = run(plain, host_state, batches)
  got_metrics, got_params, got_eval = run(chunked, host_state, batches)
  for got, want in zip(got_metrics, want_metrics):
    for key in ('loss', 'total_loss', 'grad_norm'):
      close(got[key], want[key])
  jax.tree.map(close, got_params, want_params)
  assert set(got_eval) == set(want_eval)
  for key in want_eval:
    close(got_eval[key], want_eval[key])
  assert ('lm_head' in got_params) != tied


def test_negative_chunk_is_refused():
  with pytest.raises(ValueError, match='loss_vocab_chunk=-1 must be >= 0'):
    dataclasses.replace(ModelConfig(), loss_vocab_chunk=-1)
