"""The self-improvement loop end to end on a tiny byte-level model: its lineage files, the gate's numbers recomputed
from the stored outcomes, and resuming after kills in the generate and train stages (one loop run shared)."""
import os
import shutil

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from experiments.configs import improve_arith
from lmlab.eval import stats
from lmlab.improve import feedback, loop, records
from tests import tiny


def tiny_config(**overrides):
  """improve_arith cut to a 2-layer d_model-32 model, 1-digit base additions, one round of 2-digit problems."""
  c = improve_arith.get_config()
  i = c.improve
  i.iterations, i.base_digits, i.base_examples, i.base_steps, i.eval_examples = 1, 1, 50, 40, 24
  i.pool_size, i.samples_per_prompt, i.steps, i.batch_size, i.n_boot = 8, 2, 8, 16, 200
  i.max_new_tokens, i.pad_to = 4, 2
  c.model.d_model, c.model.num_layers, c.model.ffn_dim, c.batch_size = 32, 2, 64, 8
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
  assert len(samples) == 8 * 2 and len({s['sample_id'] for s in samples}) == 16
  digits = lambda question: max(len(str(int(x[::-1]))) for x in question.rstrip('=').split('+'))
  assert {digits(s['question']) for s in samples} == {2}  # round 1 labels 2-digit problems
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
