"""Remat policies that keep named activations: each gives remat=none's loss and gradients, every name it keeps exists
in the block, and XLA's temporaries grow with what is kept, between full recomputation and none."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmlab.models import ModelConfig, Transformer
from lmlab.models.config import REMAT_SAVE_SETS
from lmlab.train import losses

CONFIG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64,
                     compute_dtype='float32')
B, L = 2, 16
# The offload_* policies are built like the save_* ones from the same sets: one of them shows they compile and run here
# (a CPU has a pinned_host memory space; the transfer saves nothing on it, so only a GPU run can show their worth).
POLICIES = ('none', 'full', *(f'save_{key}' for key in REMAT_SAVE_SETS), 'offload_attention')


def loss_fn(config, tokens_BL):
  def loss(params):
    logits_BLV, _ = Transformer(config).apply({'params': params}, tokens_BL[:, :-1])
    return losses.token_cross_entropy(logits_BLV, tokens_BL[:, 1:], jnp.ones((B, L)))[0]
  return loss


@pytest.fixture(scope='module')
def tokens_and_params():
  tokens_BL = jax.random.randint(jax.random.key(0), (B, L + 1), 0, CONFIG.vocab_size)
  boxed = Transformer(CONFIG).init(jax.random.key(1), tokens_BL[:, :-1])['params']
  return tokens_BL, jax.tree.map(lambda x: getattr(x, 'value', x), boxed, is_leaf=lambda x: hasattr(x, 'value'))


@pytest.fixture(scope='module')
def results(tokens_and_params):
  """{policy: (loss, gradients, temp bytes)}, one compile each. XLA's optimisation level 0 halves the compile time
  here and assigns the same buffers (checked against the default level for save_qkv_proj: 172,328 bytes both)."""
  tokens_BL, params = tokens_and_params
  out = {}
  for policy in POLICIES:
    grad_fn = jax.jit(jax.value_and_grad(loss_fn(dataclasses.replace(CONFIG, remat=policy), tokens_BL)))
    compiled = grad_fn.lower(params).compile({'xla_backend_optimization_level': 0})
    out[policy] = (*jax.device_get(compiled(params)), compiled.memory_analysis().temp_size_in_bytes)
  return out


@pytest.mark.parametrize('policy', POLICIES[1:])
def test_policy_gives_the_loss_and_gradients_of_no_remat(results, policy):
  want_loss, want_grads, _ = results['none']
  loss, grads, _ = results[policy]
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    # Recomputation fuses differently: float32 rounding of the same sums, judged against each gradient's norm.
    assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want)


def test_every_kept_name_exists_in_the_block(tokens_and_params):
  tokens_BL, params = tokens_and_params
  jaxpr = str(jax.make_jaxpr(loss_fn(CONFIG, tokens_BL))(params))
  names = set(re.findall(r'name\[name=(\w+)\]', jaxpr))
  assert names == {name for kept in REMAT_SAVE_SETS.values() for name in kept}


def test_offload_moves_exactly_the_named_activations_to_host_memory(tokens_and_params):
  tokens_BL, params = tokens_and_params
  jaxpr = str(jax.make_jaxpr(jax.grad(loss_fn(dataclasses.replace(CONFIG, remat='offload_attention'), tokens_BL)))(
      params))
  moved = re.findall(r'name\[name=(\w+)\] \w+\s+\w+:\w+<host>', jaxpr)
  assert sorted(moved) == sorted(REMAT_SAVE_SETS['attention'])


def test_memory_grows_with_the_activations_kept(results):
  temp = {policy: result[2] for policy, result in results.items()}
  for key in REMAT_SAVE_SETS:
    assert temp['full'] < temp[f'save_{key}'] < temp['none'], (key, temp)
  # save_attention keeps a superset of the other two attention sets.
  assert temp['save_attention'] > max(temp['save_qkv_proj'], temp['save_attention_out']), temp


def test_unknown_policy_is_refused(tokens_and_params):
  tokens_BL, params = tokens_and_params
  with pytest.raises(ValueError, match="model.remat='save_everything' is not one of none, full, .*save_qkv_proj"):
    loss_fn(dataclasses.replace(CONFIG, remat='save_everything'), tokens_BL)(params)
