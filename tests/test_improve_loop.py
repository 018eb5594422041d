"""The self-improvement loop end to end on a small byte-level model: its lineage files, the gate's numbers recomputed
from the stored outcomes, resuming after kills in the generate and train stages, the gate on rounds trained on right
and on deliberately wrong labels, and a GRPO round (one base model shared)."""
import json
import os
import shutil

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from experiments.configs import improve_arith
from lmlab.eval import stats
from lmlab.improve import feedback, grpo_reward, loop, records, scorers, stages
from tests import tiny


def tiny_config(**overrides):
  """improve_arith cut to 1-2 digit base additions padded to 3 digits and one round of 3-digit problems: the fewest
  base steps (500) after which the base adds 2-digit numbers (a 1-digit base, or 300 steps, adds nothing)."""
  c = improve_arith.get_config()
  i = c.improve
  i.iterations, i.base_digits, i.base_examples, i.base_steps, i.eval_examples = 1, 2, 500, 500, 48
  i.pool_size, i.samples_per_prompt, i.steps, i.batch_size, i.n_boot = 64, 2, 100, 16, 200
  i.max_new_tokens, i.pad_to = 5, 3
  return tiny.override(c, **overrides)


class Killed(Exception):
  pass


@pytest.fixture(scope='module', autouse=True)
def persistent_compilation_cache(tmp_path_factory):
  """The loop trains and decodes the same shapes several times (base, round, resumed round): compile each once."""
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')
  before = [getattr(jax.config, n) for n in names]
  jax.config.update(names[0], str(tmp_path_factory.mktemp('jax_cache')))
  jax.config.update(names[1], 0.0)
  compilation_cache.reset_cache()
  yield
  for name, value in zip(names, before):
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('improve'))
  return workdir, loop.run(tiny_config(), workdir, log=lambda message: None)


def test_each_iteration_leaves_its_files_and_a_decision_the_statistics_reproduce(run):
  workdir, result = run
  it = os.path.join(workdir, 'iterations', '1')
  for name in ('samples.jsonl', 'scores.jsonl', 'train.jsonl', 'eval.json', 'decision.json', 'trained.json'):
    assert os.path.isfile(os.path.join(it, name)), name
  assert os.path.isdir(os.path.join(it, 'model', 'checkpoints'))
  samples = records.read_jsonl(os.path.join(it, 'samples.jsonl'))
  assert len(samples) == 64 * 2 and len({s['sample_id'] for s in samples}) == 128
  digits = lambda question: max(len(str(int(x[::-1]))) for x in question.rstrip('=').split('+'))
  assert {digits(s['question']) for s in samples} == {3}  # round 1 labels 3-digit problems
  decision = records.read_json(os.path.join(it, 'decision.json'))
  assert decision == result['decisions'][0]
  current = records.read_json(os.path.join(workdir, 'base', 'eval.json'))['heldout']['outcomes']
  candidate = records.read_json(os.path.join(it, 'eval.json'))['heldout']['outcomes']
  assert decision['heldout'] == stats.paired_comparison(candidate, current, n_boot=200, seed=0 + 1)
  assert decision['accepted'] == (decision['heldout']['ci_low'] > 0 and all(g['passed'] for g in decision['guards']))
  assert decision['fingerprint'] == loop.fingerprint(tiny_config())
  lineage = records.read_json(os.path.join(workdir, 'lineage.json'))
  assert [e['model'] for e in lineage] == ['base/model'] + (['iterations/1/model'] if decision['accepted'] else [])
  with open(os.path.join(workdir, 'progress.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_a_rerun_repeats_nothing_and_another_config_is_refused(run):
  workdir, result = run
  stages = []
  again = loop.run(tiny_config(), workdir, hook=lambda stage, it: stages.append(stage), log=lambda message: None)
  assert stages == [] and again['decisions'] == result['decisions']
  with pytest.raises(ValueError, match='was run with another config'):
    loop.run(tiny_config(**{'improve.temperature': 0.9}), workdir, log=lambda message: None)


def _start_of_round_1(workdir: str, new: str, names=('config.json', 'tasks', 'base')) -> str:
  """A new workdir holding what `workdir` had as round 1 started."""
  os.makedirs(new)
  for name in names:
    copy = shutil.copytree if os.path.isdir(os.path.join(workdir, name)) else shutil.copy
    copy(os.path.join(workdir, name), os.path.join(new, name))
  return new


def kill_at(where):
  def hook(stage, it):
    if stage == where:
      raise Killed(f'{stage} {it}')
  return hook


def test_resume_after_kills_in_generate_and_train_gives_the_same_decision(run, tmp_path):
  workdir, result = run
  resumed = _start_of_round_1(workdir, str(tmp_path / 'resumed'))

  for where in ('generate', 'trained'):  # in generate, then after training saved its checkpoint but before its marker
    with pytest.raises(Killed):
      loop.run(tiny_config(), resumed, hook=kill_at(where), log=lambda message: None)
  assert os.path.isfile(os.path.join(resumed, 'iterations', '1', 'samples.jsonl'))
  assert not os.path.exists(os.path.join(resumed, 'iterations', '1', 'trained.json'))
  second = loop.run(tiny_config(), resumed, log=lambda message: None)
  assert second['decisions'] == result['decisions']
  for name in ('samples.jsonl', 'scores.jsonl', 'train.jsonl'):
    assert records.read_jsonl(os.path.join(resumed, 'iterations', '1', name)) == \
        records.read_jsonl(os.path.join(workdir, 'iterations', '1', name))


def test_a_paused_round_scores_with_the_reviewers_rating_in_place_of_the_verifier(run, tmp_path):
  workdir, _ = run
  config = tiny_config(**{'improve.scorers': 'verifier', 'improve.pause_for_review': True})
  paused = _start_of_round_1(workdir, str(tmp_path / 'paused'), names=('tasks', 'base'))
  with pytest.raises(loop.Paused, match='experiments.review'):
    loop.run(config, paused, log=lambda message: None)
  it = os.path.join(paused, 'iterations', '1')
  assert not os.path.exists(os.path.join(it, 'scores.jsonl'))
  sample = records.read_jsonl(os.path.join(it, 'samples.jsonl'))[3]
  right = sample['text'] == sample['answer']
  feedback.append(os.path.join(paused, 'feedback'), {'sample_id': sample['sample_id'], 'rating': 1 if right else 5,
                                                     'annotator': 'ann', 'time': '2026-11-30T12:00:00Z'})
  with pytest.raises(Killed, match='select 1'):  # stop once scored: training is the other tests' business
    loop.run(config, paused, hook=kill_at('select'), log=lambda message: None)
  scores = {r['sample_id']: r for r in records.read_jsonl(os.path.join(it, 'scores.jsonl'))}
  judged = scores[sample['sample_id']]
  assert judged['automated_reward'] == float(right) and judged['reward'] == float(not right)
  assert judged['source'] == 'human' and judged['ratings'] == {'ann': 1 if right else 5}
  assert {r['source'] for k, r in scores.items() if k != sample['sample_id']} == {'automated'}


def _reviewed_round(workdir: str, new: str, correct) -> dict:
  """Round 1 from `workdir`'s base with the verifier, paused for review: a reviewer corrects every sample to
  correct(answer), then the round runs to its decision."""
  config = tiny_config(**{'improve.scorers': 'verifier', 'improve.pause_for_review': True})
  reviewed = _start_of_round_1(workdir, new, names=('tasks', 'base'))
  with pytest.raises(loop.Paused):
    loop.run(config, reviewed, log=lambda message: None)
  for s in records.read_jsonl(os.path.join(reviewed, 'iterations', '1', 'samples.jsonl')):
    if s['answer'] != correct(s['answer']):  # a wrong correction: the reviewer also rejects what the verifier keeps
      feedback.append(os.path.join(reviewed, 'feedback'), {'sample_id': s['sample_id'], 'rating': 1,
                                                            'annotator': 'ann', 'time': '2026-11-30T12:00:00Z'})
    feedback.append(os.path.join(reviewed, 'feedback'), {'sample_id': s['sample_id'], 'corrected_text':
                                                          correct(s['answer']), 'annotator': 'ann',
                                                          'time': '2026-11-30T12:00:00Z'})
  loop.run(config, reviewed, log=lambda message: None)
  return records.read_json(os.path.join(reviewed, 'iterations', '1', 'decision.json'))


def test_the_gate_accepts_a_round_on_right_labels_and_rejects_one_on_wrong_labels(run, tmp_path):
  """The same round of the same base, its labels the reviewer's corrections: the true sums (a real improvement) or
  every digit shifted by one (deliberately wrong, and the verifier's right samples rated 1)."""
  workdir, _ = run
  right = _reviewed_round(workdir, str(tmp_path / 'right'), lambda answer: answer)
  assert right['selected_label_accuracy'] == 1.0
  assert right['accepted'] and right['reasons'] == [] and right['heldout']['ci_low'] > 0
  assert right['candidate_heldout'] > right['current_heldout']
  wrong = _reviewed_round(workdir, str(tmp_path / 'wrong'),
                          lambda answer: ''.join(str((int(d) + 1) % 10) for d in answer))
  assert wrong['selected_label_accuracy'] == 0.0 and wrong['current_heldout'] == right['current_heldout']
  assert not wrong['accepted'] and wrong['candidate_heldout'] <= wrong['current_heldout']
  assert 'is not significantly above 0' in wrong['reasons'][0]


def test_a_grpo_round_trains_on_the_rounds_prompts_with_the_loops_reward_and_is_gated(run, tmp_path):
  workdir, _ = run
  config = tiny_config(**{'improve.method': 'grpo', 'improve.scorers': 'verifier', 'improve.steps': 3, 'log_every': 1})
  grpo = _start_of_round_1(workdir, str(tmp_path / 'grpo'), names=('tasks', 'base'))
  result = loop.run(config, grpo, log=lambda message: None)
  it = os.path.join(grpo, 'iterations', '1')
  for name in ('samples.jsonl', 'scores.jsonl', 'train.jsonl', 'eval.json', 'decision.json', 'trained.json'):
    assert os.path.isfile(os.path.join(it, name)), name
  samples = records.read_jsonl(os.path.join(it, 'samples.jsonl'))
  rows = records.read_jsonl(os.path.join(it, 'train.jsonl'))
  assert [(r['prompt'], r['answer']) for r in rows] == [(s['question'], s['answer']) for s in samples[::2]]
  assert rows[0]['scoring'] == scorers.settings(config)
  metadata = records.read_json(os.path.join(it, 'model', 'config.json'))
  assert metadata['finetune']['task'] == 'grpo' and metadata['grpo']['rewards'] == stages.GRPO_REWARD
  metrics = [json.loads(line) for line in open(os.path.join(it, 'model', 'metrics.jsonl'))]
  assert [m['step'] for m in metrics if 'grpo/reward_mean' in m] == [1, 2, 3]
  decision = records.read_json(os.path.join(it, 'decision.json'))
  assert decision == result['decisions'][0] and decision['candidate'] == 'iterations/1/model'
  current = records.read_json(os.path.join(grpo, 'base', 'eval.json'))['heldout']['outcomes']
  candidate = records.read_json(os.path.join(it, 'eval.json'))['heldout']['outcomes']
  assert decision['heldout'] == stats.paired_comparison(candidate, current, n_boot=200, seed=0 + 1)
  # the reward GRPO trained on is the score stage's, on the text up to the first newline as generation cuts it
  for s, r in zip(samples, records.read_jsonl(os.path.join(it, 'scores.jsonl'))):
    assert grpo_reward.reward(s['question'], s['text'] + '\nmore', rows[0] | {'answer': s['answer']}) == r['reward']
  assert grpo_reward.reward(rows[0]['prompt'], rows[0]['answer'] + '\n9', rows[0]) == 1.0
  with pytest.raises(ValueError, match='drop majority'):
    loop.run(tiny_config(**{'improve.method': 'grpo'}), str(tmp_path / 'refused'), log=lambda message: None)
