"""experiments.evaluate with task files: tasks, comparison, samples and report from the command line, the same
numbers as the library; bad rows are one line with exit status 2; --text_file keeps its keys beside tasks."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from lmlab import convert
from lmlab.convert import testing
from lmlab.eval import perplexity, tasks

TOKENIZER = testing.byte_level_tokenizer()
CONFIG = dataclasses.replace(testing.TINY['llama'], vocab_size=TOKENIZER.vocab_size)
MC_ROWS = [{'context': 'Q: 2+2=', 'choices': ['4', 'five'], 'label': 0, 'tags': ['math']},
           {'context': 'The cat sat on the', 'choices': ['mat', 'moon', 'sofa'], 'label': 1}]


def _evaluate(*flags):
  return subprocess.run([sys.executable, '-m', 'experiments.evaluate', *flags], capture_output=True, text=True,
                        env={**os.environ, 'PYTHONPATH': os.getcwd()}, timeout=300)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('cli')
  params = testing.random_params(CONFIG)
  convert.save_hf(str(root / 'model'), CONFIG, params, TOKENIZER)
  (root / 'mc.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in MC_ROWS))
  (root / 'ppl.jsonl').write_text(json.dumps({'text': 'A small document.'}) + '\n')
  return root, convert.Pretrained(CONFIG, params, {}, TOKENIZER, str(root / 'model'))


def test_tasks_comparison_samples_and_report_from_the_command_line(setup):
  root, model = setup
  text = 'Sliding windows score every token once. ' * 2
  (root / 'text.txt').write_text(text)
  out = root / 'out' / 'eval.json'
  run = _evaluate(f'--pretrained={root / "model"}', f'--task=mc:{root / "mc.jsonl"}',
                  f'--task=ppl:{root / "ppl.jsonl"}', f'--compare={root / "model"}', f'--text_file={root / "text.txt"}', f'--output_json={out}',
                  f'--samples_jsonl={root / "out" / "samples.jsonl"}', '--window=32', '--stride=16')
  assert run.returncode == 0, run.stderr[-2000:]
  result = json.loads(out.read_text())
  expected = perplexity.evaluate_texts(CONFIG, model.params, TOKENIZER, [text], window=32, stride=16)
  assert result['tokens'] == expected['tokens'] and abs(result['loss'] - expected['loss']) < 1e-5  # old keys stay
  settings = tasks.Settings(batch_size=4)
  mc, _ = tasks.evaluate_task(model, f'mc:{root / "mc.jsonl"}', settings)
  got = result['tasks'][f'mc:{root / "mc.jsonl"}']
  assert got['acc'] == mc['acc'] and got['fingerprint'] == mc['fingerprint'] and got['n'] == 2
  comparison = result['compare']['tasks'][f'mc:{root / "mc.jsonl"}']['comparison']['acc']
  assert (comparison['difference'], comparison['p_value']) == (0.0, 1.0)
  assert result['compare']['tokenizers'] == 'same'
  rows = [json.loads(line) for line in (root / 'out' / 'samples.jsonl').read_text().splitlines()]
  assert len(rows) == 2 * (2 + 1)  # two models x (two mc rows + one document)
  assert (root / 'out' / 'report.md').exists() and (root / 'out' / 'reliability_mc_mc_jsonl.png').exists()


def test_bad_task_row_is_one_line_with_exit_status_2(setup):
  root, _ = setup
  bad = root / 'bad.jsonl'
  bad.write_text(json.dumps(MC_ROWS[0]) + '\n' + json.dumps({'context': 'a', 'choices': ['b', 'c'], 'label': 5}) + '\n')
  run = _evaluate(f'--pretrained={root / "model"}', f'--task=mc:{bad}')
  assert run.returncode == 2
  assert run.stderr.strip().splitlines() == [f'error: {bad}:2: "label" 5 is out of range for 2 choices; use 0 to 1']
  run = _evaluate(f'--pretrained={root / "model"}')
  assert run.returncode == 2 and 'nothing to evaluate' in run.stderr
