"""The lm-evaluation-harness adapter: one local multiple-choice task through lm-eval's own Hugging Face backend
(torch) and through LmlabLM on the same weights gives the same accuracies and log-likelihoods, and lmlab's own
mc: task agrees with both; generate_until stops at the task's strings; the experiments.harness entry point."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lmlab import convert, generate
from lmlab.convert import testing
from lmlab.eval import tasks

harness = pytest.importorskip('lmlab.eval.harness', reason='lm-eval not installed (the eval extra)')

TOKENIZER = testing.byte_level_tokenizer()
CONFIG = dataclasses.replace(testing.TINY['llama'], vocab_size=TOKENIZER.vocab_size)
ROWS = [{'context': 'Q: 2+2=', 'choices': ['4', 'five', '22'], 'label': 0},
        {'context': 'The cat sat on the', 'choices': ['mat', 'moon'], 'label': 1},
        {'context': 'Colour of the sky:', 'choices': ['blue', 'green', 'a very long answer'], 'label': 0},
        {'context': 'One, two,', 'choices': ['three', 'four'], 'label': 0},
        {'context': 'über', 'choices': ['naïve', 'plain'], 'label': 1},
        {'context': 'Yes or no?', 'choices': ['yes', 'no'], 'label': 1}]
METRICS = ('acc', 'acc_norm', 'acc_mutual_info')


@pytest.fixture(scope='module')
def task_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('harness')
  (root / 'data.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in ROWS))
  metrics = ''.join(f'  - metric: {m}\n' for m in METRICS)
  (root / 'tiny_mc.yaml').write_text(
      'task: lmlab_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n'
      f'    test: {root / "data.jsonl"}\ntest_split: test\noutput_type: multiple_choice\n'
      'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
      f'metric_list:\n{metrics}')
  return root


@pytest.fixture(scope='module')
def model():
  return convert.Pretrained(CONFIG, testing.random_params(CONFIG), {}, TOKENIZER, 'tiny')


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory, model):
  path = tmp_path_factory.mktemp('hf')
  convert.save_hf(str(path), CONFIG, model.params, TOKENIZER)
  return path


@pytest.fixture(scope='module')
def ours(task_dir, model):
  """lmlab's own mc: task on the same file: TARGET_DELIMITER and the unconditional requests are lm-eval's."""
  return tasks.evaluate_task(model, f'mc:{task_dir / "data.jsonl"}', tasks.Settings(batch_size=4, n_boot=10))[0]


def _logliks(output):
  """Per document, per request (choices, then unconditional choices) log-likelihoods from lm-eval's samples."""
  docs = sorted(output['samples']['lmlab_tiny_mc'], key=lambda s: s['doc_id'])
  return [[float(r[0][0]) for r in d['resps']] for d in docs]


def test_lmlab_lm_matches_lm_eval_hf_backend(task_dir, model, hf_dir, ours):
  pytest.importorskip('torch', reason='lm-eval\'s HF backend needs torch (the [parity] extra)')
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval.models.huggingface import HFLM  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  # logits_cache=False: lm-eval 0.4.13's shared-prefix cache mis-scores continuations of different lengths.
  hf = HFLM(pretrained=str(hf_dir), device='cpu', dtype='float32', batch_size=4, logits_cache=False)
  expected = lm_eval.simple_evaluate(model=hf, tasks=['lmlab_tiny_mc'], bootstrap_iters=0,
                                     task_manager=TaskManager(include_path=str(task_dir)))
  got = harness.run(model, ['lmlab_tiny_mc'], str(task_dir), batch_size=4, log_samples=True, bootstrap_iters=0)
  np.testing.assert_allclose(np.concatenate(_logliks(got)), np.concatenate(_logliks(expected)), atol=1e-4)
  for metric in METRICS:
    key = f'{metric},none'
    value = expected['results']['lmlab_tiny_mc'][key]
    assert got['results']['lmlab_tiny_mc'][key] == value == ours[metric], metric
  assert 0 < ours['acc'] < 1 or ours['acc_norm'] != ours['acc']  # the task tells the metrics apart


def test_generate_until_stops_at_the_requested_strings(model):
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top
  lm = harness.LmlabLM(model, batch_size=2)
  prompts = ['Q: 1+1=', 'Once up', 'x']
  full = [TOKENIZER.decode(ids) for ids in generate.generate(CONFIG, model.variables, [TOKENIZER.encode(p)
                                                                                      for p in prompts[:2]],
                                                             5, eos_ids=(256,), pad_id=256)]
  stop = full[0][2:4]  # a string the first greedy output contains: it must end there
  requests = [Instance('generate_until', {}, (p, {'until': [stop], 'max_gen_toks': 5}), i)
              for i, p in enumerate(prompts[:2])]
  got = lm.generate_until(requests)
  assert got[0] == full[0][:full[0].index(stop)]
  assert got[1] == (full[1][:full[1].index(stop)] if stop in full[1] else full[1])


def test_harness_entry_point_writes_lm_eval_results(tmp_path, task_dir, hf_dir, ours):
  out = tmp_path / 'out.json'
  run = subprocess.run([sys.executable, '-m', 'experiments.harness', f'--pretrained={hf_dir}',
                        '--tasks=lmlab_tiny_mc', f'--include_path={task_dir}', f'--output_json={out}',
                        '--batch_size=4'], capture_output=True, text=True,
                       env={**os.environ, 'PYTHONPATH': os.getcwd()}, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result['results']['lmlab_tiny_mc']['acc,none'] == ours['acc']
  assert result['model'] == str(hf_dir)
  bad = subprocess.run([sys.executable, '-m', 'experiments.harness', f'--pretrained={hf_dir}',
                        '--tasks=x', f'--include_path={tmp_path / "nowhere"}'], capture_output=True, text=True,
                       env={**os.environ, 'PYTHONPATH': os.getcwd()}, timeout=300)
  assert bad.returncode == 2 and 'is not a directory' in bad.stderr
