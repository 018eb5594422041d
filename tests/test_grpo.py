"""GRPO through lmlab's one train step: a rollout batch of a tiny LoRA Llama gives loss 0, a real gradient, KL 0."""
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from experiments.configs import base
from lmlab import sharding
from lmlab.convert.testing import TINY
from lmlab.data import pipeline
from lmlab.finetune import grpo, reference, tasks
from lmlab.train import optim, state as state_lib, step as step_lib


def rows(lengths, L=16, seed=0):
  """SFT rows (SftTask._row) of 3 prompt tokens + completions of the given lengths, random ids."""
  rng = np.random.default_rng(seed)
  task = types.SimpleNamespace(config=types.SimpleNamespace(seq_len=L), tokenizer=types.SimpleNamespace(pad_id=0))
  out = []
  for n in lengths:
    ids = rng.integers(1, 96, 3 + n).tolist()
    out.append(tasks.SftTask._row(task, ids, [0.0] * 3 + [1.0] * n))  # pylint: disable=protected-access
  return out


def test_rollout_batch_masks_completions_and_normalises():
  batch = grpo.rollout_batch(rows([2, 5, 1, 4]), [[1.0, 0.0], [0.5, 0.5]], 'sequence')
  assert batch['response'].sum(-1).tolist() == [2, 5, 1, 4]  # completion tokens only (the prompt's are 0)
  np.testing.assert_allclose(batch['weights'].sum(-1), [1, 1, 1, 1], rtol=1e-6)  # each completion counts once
  want = 0.5 / (np.sqrt(0.5) + 1e-4)
  np.testing.assert_allclose(batch['advantages'], [want, -want, 0.0, 0.0], rtol=1e-6)
  with pytest.raises(ValueError, match='one reward per completion'):
    grpo.rollout_batch(rows([2, 5]), [[1.0, 0.0, 1.0]], 'token')


def test_first_step_loss_is_zero_gradient_is_not_and_kl_is_zero():
  c = base.get_base_config()
  c.learning_rate, c.warmup_steps = 1e-2, 1
  model = reference.ReferencedModel(TINY['llama'], method='lora', lora_rank=4, lora_alpha=8.0)
  eval_model = reference.ReferencedModel(TINY['llama'], method='lora', lora_rank=4, lora_alpha=8.0)
  mesh = sharding.make_mesh({'data': -1}, jax.devices()[:1])
  rules = sharding.rules_from_config(c.sharding_rules)
  tx = optim.make_optimizer(c)
  train_step = jax.jit(step_lib.make_train_step(model, tx, optim.learning_rate_schedule(c), c,
                                                grpo.grpo_loss_fn(model, eval_model, beta=0.04)))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = state_lib.state_shardings(model, tx, 0, 16, mesh, rules)
    state = state_lib.create_train_state(model, tx, 0, 16, shardings)
    batch = grpo.rollout_batch(rows([5, 2, 7, 3, 4, 6, 1, 5]), [[1, 0, 0, 1], [0.2, 0.9, 0.4, 0.1]], 'sequence')
    state, metrics = train_step(state, pipeline.to_global(batch, mesh))
    assert abs(float(metrics['loss'])) < 1e-6  # -mean(A) over responses: advantages are zero-mean per group
    assert float(metrics['grad_norm']) > 1e-4
    assert float(metrics['grpo/kl']) < 1e-9 and float(metrics['grpo/clipped']) == 0.0  # policy = reference
    for _ in range(2):  # the warmup's first learning rate is 0: the second step is the first that moves
      state, metrics = train_step(state, pipeline.to_global(batch, mesh))
    assert float(metrics['grpo/kl']) > 1e-6  # the adapters moved: the policy left the reference (adapters off)
