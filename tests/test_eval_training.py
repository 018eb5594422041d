"""config.eval_tasks: multiple-choice and generative tasks scored at every evaluation of a training run."""
import json
import os

import pytest
import tiny

from lmlab import convert
from lmlab.eval import tasks
from lmlab.train import loop, metrics


def write_jsonl(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp('eval_training')
  mc = write_jsonl(root / 'mc.jsonl', [
      {'context': 'def f(x):\n    return', 'choices': [' x', ' 1 +', ' (('], 'label': 0, 'tags': ['code']},
      {'context': 'import', 'choices': [' os', ' !!', ' 3'], 'label': 0},
      {'context': 'class A:\n   ', 'choices': [' pass', ' )', ' ]'], 'label': 0, 'tags': ['code']}])
  gen = write_jsonl(root / 'gen.jsonl', [{'prompt': '1 + 1 =', 'answer': '2'}, {'prompt': 'x =', 'answer': '3'}])
  config = tiny.dense_config(steps=4, eval_every=2, eval_batches=1, checkpoint_every=4, log_every=1,
                             eval_tasks=f'mc:{mc}, gen:{gen}')
  workdir = str(root / 'run')
  summary = loop.run(config, workdir)
  return summary, workdir, mc, gen


def test_task_metrics_are_logged_at_every_evaluation_and_kept_in_the_summary(run):
  summary, workdir, mc, gen = run
  rows = [r for r in metrics.read_rows(os.path.join(workdir, 'metrics.jsonl')) if 'eval_loss' in r]
  assert [r['step'] for r in rows] == [2, 4]
  for row in rows:
    assert 0.0 <= row[f'eval/mc:{mc}/acc'] <= 1.0 and f'eval/mc:{mc}/ece' in row
    assert row[f'eval/gen:{gen}/exact_match_flexible'] in (0.0, 0.5, 1.0)
  assert summary[f'eval/mc:{mc}/acc'] == rows[-1][f'eval/mc:{mc}/acc']


def test_task_metrics_equal_an_evaluation_of_the_saved_checkpoint(run):
  """The training-time numbers are what experiments.evaluate gives on the final checkpoint (an independent path)."""
  summary, workdir, mc, _ = run
  results, _ = tasks.evaluate_task(convert.load_model(workdir), f'mc:{mc}')
  for metric in ('acc', 'acc_norm', 'brier', 'ece'):
    assert summary[f'eval/mc:{mc}/{metric}'] == pytest.approx(results[metric], abs=1e-6), metric


def test_a_bad_task_file_fails_before_training(tmp_path):
  bad = write_jsonl(tmp_path / 'bad.jsonl', [{'context': 'a', 'choices': ['b'], 'label': 3}])
  with pytest.raises(ValueError, match=r'bad.jsonl:1'):
    loop.Trainer(tiny.dense_config(eval_tasks=f'mc:{bad}'), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints' / '0')
