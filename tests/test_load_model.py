"""lmlab.convert.load_model: a run's workdir is a model (latest intact, @best, @STEP), read like training reads it."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny
from lmlab import convert
from lmlab.convert import mapping, testing
from lmlab.data import tokenizers
from lmlab.eval import perplexity
from lmlab.train import loop
from test_checkpoint import change_recorded_digest

# Damage makes Orbax abandon tensorstore reads mid-flight; their coroutines are never awaited.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')

TEXT = 'def add(a, b):\n    return a + b\n'


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A 4-step run of the tiny decoder with checkpoints and evaluations at steps 2 and 4."""
  path = str(tmp_path_factory.mktemp('load') / 'run')
  loop.run(tiny.dense_config(steps=4, checkpoint_every=2, eval_every=2, eval_batches=1, log_every=1), path)
  return path


def saved_params(workdir, step):
  """The params as Orbax itself reads them back from the step's state item."""
  state = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))
  return mapping.to_numpy(state['params'])


def test_a_workdir_loads_its_latest_best_or_given_step(workdir):
  latest = convert.load_model(workdir)
  assert (latest.step, latest.source, latest.tokenizer.name) == (4, f'{workdir} step 4', 'bytes')
  assert latest.config.d_model == 32 and latest.model_state == {} and latest.metadata['tokenizer'] == {'kind': 'bytes'}
  for name, value in mapping.flatten(saved_params(workdir, 4)).items():
    np.testing.assert_array_equal(mapping.flatten(latest.params)[name], value, err_msg=name)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    evals = {row['step']: row['eval_loss'] for row in map(json.loads, f) if 'eval_loss' in row}
  assert sorted(evals) == [2, 4]
  assert convert.load_model(f'{workdir}@best').step == min(evals, key=evals.get)
  two = convert.load_model(f'{workdir}@2')
  assert two.step == 2 and two.source == f'{workdir} step 2'
  for name, value in mapping.flatten(saved_params(workdir, 2)).items():
    np.testing.assert_array_equal(mapping.flatten(two.params)[name], value, err_msg=name)
  config, params, tokenizer = convert.load_pretrained(workdir)  # the (config, params, tokenizer) form
  assert config == latest.config and tokenizer.name == 'bytes' and sorted(params) == sorted(latest.params)
  for suffix in ('@7', '@last'):
    with pytest.raises(ValueError, match=r'use @best or @STEP with one of the steps 2, 4'):
      convert.load_model(workdir + suffix)


@pytest.mark.parametrize('damage', ['metrics emptied', 'params disagree with their digests'])
def test_a_damaged_checkpoint_falls_back_as_in_training_and_stays_put(damage, workdir, tmp_path):
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  step_dir = os.path.join(copy, 'checkpoints', '4')
  if damage == 'metrics emptied':
    open(os.path.join(step_dir, 'metrics', 'metrics'), 'w').close()
    reason = 'DamagedCheckpoint: metrics/metrics has 0 bytes'
  else:
    change_recorded_digest(step_dir, 'params/layers/block_0/mlp/up/kernel')
    reason = 'DamagedCheckpoint: digest mismatch in params/layers/block_0/mlp/up/kernel'
  messages = []
  assert convert.load_model(copy, log=messages.append).step == 2
  assert len(messages) == 1 and messages[0].startswith(f'skipping checkpoint {step_dir}: {reason}'), messages
  assert sorted(os.listdir(os.path.join(copy, 'checkpoints'))) == ['2', '4']  # a reader moves nothing
  with pytest.raises(ValueError, match=r'checkpoint .*/4 cannot be restored \(DamagedCheckpoint: .*pick another step'):
    convert.load_model(f'{copy}@4')
  if damage != 'metrics emptied':  # verify=False takes the arrays as they are
    assert convert.load_model(copy, verify=False, log=messages.append).step == 4 and len(messages) == 1


def test_evaluate_cli_scores_a_workdir(workdir, tmp_path):
  """`--pretrained=WORKDIR` used to read the workdir's config.json as a Hugging Face one (model_type=None)."""
  (tmp_path / 'text.txt').write_text(TEXT)
  out = tmp_path / 'eval.json'
  run = subprocess.run([sys.executable, '-m', 'experiments.evaluate', f'--pretrained={workdir}@2',
                        f'--text_file={tmp_path / "text.txt"}', f'--output_json={out}', '--window=64'],
                       capture_output=True, text=True, cwd=tiny.ROOT, env={**os.environ, 'PYTHONPATH': tiny.ROOT},
                       timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  result = json.loads(out.read_text())
  two = convert.load_model(f'{workdir}@2')
  expected = perplexity.evaluate_texts(two.config, two.params, two.tokenizer, [TEXT], window=64)
  assert result['model'] == f'{workdir} step 2' and result['tokens'] == len(TEXT) - 1
  assert abs(result['loss'] - expected['loss']) < 1e-6, (result, expected)


def test_a_tokenizer_record_is_rebuilt_from_its_file_or_the_directory_beside(tmp_path):
  tokenizer = testing.byte_level_tokenizer()
  tokenizer.tokenizer.save(str(tmp_path / 'tokenizer.json'))
  record = {**tokenizer.to_dict(), 'source': '/moved/away/tokenizer.json', 'add_bos': False}
  text = 'Rebuilt from a record: 123 ü'
  assert tokenizers.tokenizer_from_dict(record, str(tmp_path)).encode(text) == tokenizer.encode(text)
  assert tokenizers.tokenizer_from_dict({'kind': 'bytes'}).encode(text) == tokenizers.ByteTokenizer().encode(text)
  assert tokenizers.tokenizer_from_dict(None) is None
  with pytest.raises(ValueError, match=r"hf tokenizer file '/moved/away/tokenizer.json' does not exist"):
    tokenizers.tokenizer_from_dict(record)
