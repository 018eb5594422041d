"""GRPO through lmlab's one train step: a rollout batch of a tiny LoRA Llama gives loss 0, a real gradient, KL 0;
the grpo task samples, logs its metrics and resumes exactly; max_kl stops a diverged policy; the tiny_grpo preset
holds out problems it never trains on."""
import types

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tiny

from experiments.configs import base, tiny_grpo
from lmlab import sharding
from lmlab.convert.testing import TINY
from lmlab.data import pipeline, tokenizers
from lmlab.finetune import data, grpo, grpo_task, reference, tasks
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


def grpo_config(workdir_steps, **overrides):
  """finetune.task=grpo from scratch on the arithmetic rows: a tiny byte decoder, 4 prompts x 2 samples a step,
  rewarded for any digit or a-m (about 30% of random completions, so groups differ and the policy moves)."""
  c = base.get_base_config()
  c.finetune.task, c.finetune.method, c.finetune.dataset = 'grpo', 'full', 'arithmetic'
  c.batch_size, c.seq_len, c.learning_rate, c.warmup_steps, c.progress = 8, 48, 1e-2, 1, False
  c.steps, c.checkpoint_every, c.eval_every, c.log_every, c.eval_batches = workdir_steps, 2, 4, 1, 1
  c.model.update(vocab_size=260, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64,
                 compute_dtype='float32')
  c.grpo.update(group_size=2, max_new_tokens=4, rewards='format:.*[0-9a-m].*', eval_prompts=4, beta=0.04)
  return tiny.override(c, **overrides)


@pytest.fixture(scope='module')
def grpo_runs(tmp_path_factory):
  """(metrics rows, final params) of 4 uninterrupted steps and of a run resumed from the first one's step 2, and
  their root directory."""
  from lmlab.finetune import trainer  # pylint: disable=g-import-not-at-top
  from lmlab.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('grpo')
  out = []
  for name, restore in (('straight', 'latest'), ('resumed', str(root / 'straight' / 'checkpoints' / '2'))):
    trainer.run(grpo_config(4, **{'finetune.export': False, 'restore': restore, 'eval_at_start': True}),
                str(root / name))
    state = ocp.PyTreeCheckpointer().restore(str(root / name / 'checkpoints' / '4' / 'state'))
    out.append((metrics_lib.read_rows(str(root / name / 'metrics.jsonl')), state['params']))
  return out, root


def test_grpo_task_logs_its_metrics_and_resumes_exactly(grpo_runs):
  ((straight, params), (resumed, resumed_params)), root = grpo_runs
  assert (root / 'straight' / 'loss.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'  # with reward and exact match
  train = [r for r in straight if 'loss' in r]
  assert [r['step'] for r in train] == [1, 2, 3, 4]
  for key in ('grpo/reward_mean', 'grpo/reward_std', 'grpo/kl', 'grpo/clipped', 'grpo/response_length',
              'grpo/zero_variance_groups'):
    assert all(np.isfinite(r[key]) for r in train), key
  assert train[0]['grpo/kl'] < 1e-9 and train[-1]['grpo/kl'] > 1e-9  # starts at its reference, then leaves it
  assert min(r['grpo/zero_variance_groups'] for r in train) < 1  # some group had a signal to learn from
  evaluation = [r for r in straight if 'eval_exact_match' in r]
  assert [r['step'] for r in evaluation] == [0, 4]  # eval_at_start: the starting point, then every eval_every
  assert all(0 <= r['eval_exact_match'] <= 1 for r in evaluation)
  assert abs(evaluation[0]['eval_loss'] - np.log(260)) < 0.05  # a fresh init predicts ~uniformly over 260 bytes
  assert [r['step'] for r in resumed if 'eval_loss' in r] == [4]  # a resumed run does not start over
  # Resume is exact: the same prompts, samples (seeded by step), rewards and updates as the uninterrupted run.
  assert [r['step'] for r in resumed if 'loss' in r] == [3, 4]
  same = lambda rows: [{k: v for k, v in r.items() if k != 'tokens_per_s'} for r in rows if r['step'] > 2]
  assert same(straight) == same(resumed)
  jax.tree.map(np.testing.assert_array_equal, params, resumed_params)


def test_max_kl_stops_a_diverged_policy_in_one_line():
  task = tasks.make_task(grpo_config(4, **{'grpo.max_kl': 0.5}))
  task.check_metrics(3, {'grpo/kl': 0.4})
  with pytest.raises(FloatingPointError, match=r'diverged at step 3: KL to the reference 0.6 > grpo.max_kl=0.5') as e:
    task.check_metrics(3, {'grpo/kl': 0.6})
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match='group_size=3 must be >= 2 and divide batch_size=8'):
    tasks.make_task(grpo_config(4, **{'grpo.group_size': 3}))


def test_tiny_grpo_preset_holds_out_disjoint_problems_evaluates_all_and_fits_its_rollouts():
  """The preset's eval_exact_match is over every held-out problem, none of them a training prompt."""
  c = tiny_grpo.get_config('grpo')
  tokenizer = tokenizers.tokenizer_from_config(c.data)
  train, held_out = ({r['prompt'] for r in data.sft_records(c, split)} for split in ('train', 'validation'))
  assert train and held_out and not train & held_out
  assert len(held_out) <= c.grpo.eval_prompts  # eval_exact_match is over every held-out problem
  task = types.SimpleNamespace(config=c, tokenizer=tokenizer)
  longest = max(len(grpo_task.GrpoTask.prompt_ids(task, {'prompt': p})) for p in train | held_out)
  assert longest + c.grpo.max_new_tokens <= c.seq_len + 1  # a rollout row (prompt + completion, shifted) is not cut
