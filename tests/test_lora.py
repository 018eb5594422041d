"""LoRA: adapters start as a no-op, training moves only them, merging gives W + (alpha/r) A @ B exactly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmlab import sharding
from lmlab.convert.testing import TINY
from lmlab.finetune import lora
from lmlab.finetune.tasks import FinetuneModel
from tests.test_finetune import run_steps, sft_config


def lora_params(targets='attn/(query|value|out)', rank=4, alpha=8.0, seed=0):
  model = FinetuneModel(TINY['llama'], method='lora', lora_rank=rank, lora_alpha=alpha, lora_targets=targets)
  variables = sharding.strip_boxes(model.init({'params': jax.random.key(seed)}, jnp.zeros((1, 8), jnp.int32)))
  return model, lora.merge_trees(variables['params'], variables['frozen'])


def test_adapters_mirror_the_kernels_they_adapt():
  _, params = lora_params()
  adapters, L, D, r = params['lora']['layers']['block_0']['attn'], 2, 64, 4
  assert adapters['query']['a'].shape == (L, D, r) and adapters['query']['b'].shape == (L, r, 4, 16)
  assert adapters['out']['a'].shape == (L, 4, 16, r) and adapters['out']['b'].shape == (L, r, D)
  assert 'key' not in adapters and float(params['lora']['scale']) == 2.0
  assert all(float(jnp.abs(x['b']).max()) == 0.0 for x in adapters.values())  # B = 0: starts as the base model


def test_merge_is_w_plus_scaled_a_b_exactly():
  _, params = lora_params(rank=4, alpha=8.0)
  rng = np.random.default_rng(0)
  adapters = params['lora']['layers']['block_0']['attn']
  for node in adapters.values():
    node['b'] = jnp.asarray(rng.standard_normal(node['b'].shape), jnp.float32)
  merged = lora.merged(params)
  assert 'lora' not in merged
  attn, base = merged['layers']['block_0']['attn'], params['layers']['block_0']['attn']
  a, b = (np.asarray(adapters['query'][k], np.float64) for k in 'ab')
  want = np.asarray(base['query']['kernel'], np.float64) + 2.0 * np.einsum('ldr,lrhk->ldhk', a, b)
  np.testing.assert_allclose(attn['query']['kernel'], want, rtol=1e-5, atol=1e-6)
  a, b = (np.asarray(adapters['out'][k], np.float64) for k in 'ab')
  want = np.asarray(base['out']['kernel'], np.float64) + 2.0 * np.einsum('lhkr,lrd->lhkd', a, b)
  np.testing.assert_allclose(attn['out']['kernel'], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(attn['key']['kernel'], base['key']['kernel'])


def test_a_pattern_that_matches_nothing_is_an_error():
  with pytest.raises(ValueError, match="matches no kernel"):
    lora_params(targets='attn/nothing')


def test_training_moves_only_the_adapters():
  config = sft_config(method='lora')
  before, after = run_steps(config, steps=4)
  assert sorted(after.params) == ['lora']  # the only trainable (and optimizer-carrying) leaves
  assert sorted(after.params['lora']['layers']['block_0']['attn']) == ['query', 'value']
  jax.tree.map(np.testing.assert_array_equal, after.model_state['frozen'], before.model_state['frozen'])
  assert float(after.model_state['frozen']['lora']['scale']) == 2.0  # alpha / r: a constant, not trained
  moved = jax.tree.map(lambda x, y: float(np.abs(x - y).max()), after.params['lora'], before.params['lora'])
  assert all(v > 0 for v in jax.tree.leaves(moved))


def test_full_finetuning_trains_every_weight():
  before, after = run_steps(sft_config(method='full'), steps=2)
  assert after.model_state['frozen'] == {} and 'lora' not in after.params
  moved = jax.tree.map(lambda x, y: float(np.abs(x - y).max()), after.params, before.params)
  assert all(v > 0 for v in jax.tree.leaves(moved))
