"""DPO and reward-model tasks: pairs stay together, the reference is the starting model, a tiny Llama learns its
preference pairs, and 8 simulated devices train exactly like one."""
import dataclasses
import functools
import json
import math
import os
import tempfile

import jax
import numpy as np
import pytest
import tiny

from experiments.configs import base
from lmlab import convert, rewards
from lmlab.convert.testing import TINY, byte_level_tokenizer, random_params
from lmlab.data import pipeline
from lmlab.finetune import dpo, preference_data, tasks, trainer
from lmlab.train import build


@functools.lru_cache(maxsize=None)
def fixtures_dir() -> str:
  """A tiny Llama (byte-level vocabulary) as a Hugging Face directory, and preference jsonl files."""
  path = tempfile.mkdtemp(prefix='lmlab_dpo_')
  config = dataclasses.replace(TINY['llama'], vocab_size=260)  # the 257 byte-level ids, divisible by 2 and 4
  convert.save_hf(os.path.join(path, 'llama'), config, random_params(config, seed=0), byte_level_tokenizer())
  with open(os.path.join(path, 'pairs.jsonl'), 'w') as f:
    for i in range(40):
      f.write(json.dumps({'prompt': f'is {i} a number?', 'chosen': 'yes', 'rejected': 'no'}) + '\n')
    f.write(json.dumps({'prompt': 'same', 'chosen': 'x', 'rejected': 'x'}) + '\n')
    f.write(json.dumps({'prompt': 'long ' * 12, 'chosen': 'yes', 'rejected': 'no'}) + '\n')  # past seq_len
  with open(os.path.join(path, 'broken.jsonl'), 'w') as f:
    f.write(json.dumps({'prompt': 'a', 'chosen': 'b', 'rejected': 'c'}) + '\n')
    f.write(json.dumps({'prompt': 'a', 'chosen': 'b'}) + '\n')
  return path


def dpo_config(method='full', task='dpo', **overrides):
  c = base.get_base_config()
  c.init_from = os.path.join(fixtures_dir(), 'llama')
  c.finetune.task, c.finetune.method, c.finetune.dataset = task, method, f'files:{fixtures_dir()}/pairs.jsonl'
  c.data.validation_fraction = 0.0
  c.data.eval_split = c.data.train_split  # learning the train pairs is what these tests check
  c.batch_size, c.seq_len, c.learning_rate, c.warmup_steps, c.progress = 8, 48, 3e-3, 1, False
  c.model.compute_dtype = 'float32'
  c.finetune.lora_rank, c.finetune.lora_alpha = 4, 8.0
  return tiny.override(c, **overrides)


def train(config, steps, devices=1, evaluate=True):
  """(metrics per step, state before, state after, eval metrics or None) of `steps` train steps."""
  parts = build.build(config, jax.devices()[:devices], tasks.make_task(config))
  history, evaluation = [], None
  with parts.context():
    state = parts.create_state()
    before = jax.device_get(state)
    batches = parts.task.batches(config.data.train_split, shuffle=True)
    for _ in range(steps):
      state, metrics = parts.train_step(state, pipeline.to_global(next(batches), parts.mesh))
      history.append(jax.device_get(metrics))
    if evaluate:
      eval_step = parts.jit_eval_step()
      sums = [eval_step(state.params, state.model_state, pipeline.to_global(b, parts.mesh))
              for b in parts.task.batches(config.data.eval_split, shuffle=False, repeat=False)]
      evaluation = parts.task.summarize_eval(jax.tree.map(lambda *x: float(sum(x)), *jax.device_get(sums)))
  return history, before, jax.device_get(state), evaluation


@pytest.fixture(scope='module')
def full_run():
  return train(dpo_config(), steps=10)


def test_pairs_are_rows_of_two_with_only_responses_scored():
  task = tasks.make_task(dpo_config())
  split = task.config.data.train_split
  assert task.pairs[split].skipped == {'identical': 1, 'truncated': 1} and len(task.pairs[split].pairs) == 40
  batch = next(task.batches(split, shuffle=False))
  assert batch['inputs'].shape == batch['response'].shape == (8, 2, 48) and batch['weights'].shape == (8,)
  tok = task.tokenizer
  chosen = batch['targets'][0, 0][batch['response'][0, 0] > 0]
  rejected = batch['targets'][0, 1][batch['response'][0, 1] > 0]
  assert tok.decode(chosen.tolist()).startswith('yes') and tok.decode(rejected.tolist()).startswith('no')
  assert chosen[-1] == tok.eos_id and (batch['inputs'][0, 0] == batch['inputs'][0, 1])[:5].all()  # same prompt


def test_a_missing_field_names_its_file_and_line():
  config = dpo_config(**{'finetune.dataset': f'files:{fixtures_dir()}/broken.jsonl'})
  with pytest.raises(ValueError, match=r"broken.jsonl:2: a preference row has no field 'rejected'"):
    preference_data.encode(config, byte_level_tokenizer(), config.data.train_split)


def test_full_dpo_starts_at_ln2_learns_the_pairs_and_keeps_its_reference(full_run):
  history, before, after, evaluation = full_run
  losses = [float(m['loss']) for m in history]
  assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at step 0, for any beta
  assert abs(float(history[0]['dpo/reward_margin'])) < 1e-5  # no pair preferred yet (up to rounding)
  assert np.mean(losses[-3:]) < 0.6 * math.log(2), losses
  assert evaluation['eval_reward_accuracy'] > 0.9 and evaluation['eval_reward_margin'] > 0, evaluation
  assert evaluation['eval_loss'] < 0.6 * math.log(2), evaluation
  # The reference is the initial weights: a copy, neither trained nor freed by the donated train step.
  jax.tree.map(np.testing.assert_array_equal, after.model_state['reference'], before.params)
  assert not np.array_equal(after.params['embed']['embedding'], before.params['embed']['embedding'])


def test_8_devices_with_microbatches_equal_1_device(full_run):
  """data 2 x fsdp 2 x tensor 2 and 2 microbatches (4 pairs each, one per data shard) against one device."""
  overrides = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2, 'microbatches': 2}
  eight, _, _, _ = train(dpo_config(**overrides), steps=4, devices=8, evaluate=False)  # step 0's learning rate is 0
  for a, b in zip(full_run[0], eight):
    np.testing.assert_allclose(float(b['loss']), float(a['loss']), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(b['dpo/reward_margin']), float(a['dpo/reward_margin']), rtol=1e-3,
                               atol=1e-6)


def test_lora_reference_is_the_base_model_with_adapters_off():
  """No weight copy; with nonzero adapters the reference still scores like the base model, the policy does not."""
  config = dpo_config('lora')
  parts = build.build(config, jax.devices()[:1], tasks.make_task(config))
  task = parts.task
  with parts.context():
    state = jax.device_get(parts.create_state())
  assert 'reference' not in state.model_state and sorted(state.params) == ['lora']
  batch = next(task.batches(config.data.train_split, shuffle=False))
  score = jax.jit(lambda params, model_state: (
      dpo.pair_logprobs(task.eval_model, {'params': params, **model_state}, batch)[0],
      dpo.pair_logprobs(task.eval_model, task.model.reference_variables(model_state), batch)[0]))
  base_BP, _ = score(state.params, state.model_state)  # B = 0: the adapted model is the base model
  policy_BP, reference_BP = score(jax.tree.map(lambda x: x + 0.05, state.params), state.model_state)
  np.testing.assert_allclose(reference_BP, base_BP, rtol=1e-6)
  assert float(np.abs(policy_BP - base_BP).max()) > 1e-3


def test_reward_model_trains_exports_and_scores(tmp_path):
  """finetune.task=reward end to end: Bradley-Terry from a near tie to ranking the pairs; lmlab.rewards scores
  from the workdir and from the export alike."""
  workdir = str(tmp_path / 'reward')
  config = dpo_config('lora', task='reward', steps=10, checkpoint_every=10, eval_every=10, eval_batches=8, log_every=1)
  summary = trainer.run(config, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  losses = [r['loss'] for r in rows if 'loss' in r]
  assert losses[0] == pytest.approx(math.log(2), abs=0.05) and losses[-1] < losses[0]  # small random head: near a tie
  assert summary['eval_pairwise_accuracy'] > 0.9 and summary['unigram_entropy'] == pytest.approx(math.log(2))
  prompts, responses = ['is 7 a number?', 'is 7 a number?'], ['yes', 'no']
  scores = rewards.RewardModel(workdir, seq_len=48).score(prompts, responses)
  assert scores[0] > scores[1]
  np.testing.assert_allclose(rewards.RewardModel(summary['export'], seq_len=48).score(prompts, responses), scores,
                             rtol=1e-5)
