"""Attention rollout, the escaped HTML report and the whole experiments.interpret pipeline on a tiny MoE model."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lmlab import convert
from lmlab.convert import testing
from lmlab.interpret import attention_views, pipeline, report

XSS = '<script>alert(1)</script>'


def test_rollout_by_hand():
  attention_XHLL = np.array([[[[1.0, 0.0], [0.5, 0.5]]]] * 2)  # 2 layers, 1 head, 2 tokens
  # Each layer: 0.5 * A + 0.5 * I = [[1, 0], [0.25, 0.75]] (rows already sum to 1); two layers: its square.
  np.testing.assert_allclose(attention_views.rollout(attention_XHLL), [[1.0, 0.0], [0.4375, 0.5625]])
  np.testing.assert_allclose(attention_views.rollout(np.broadcast_to(np.eye(3), (4, 2, 3, 3))), np.eye(3))


def test_report_escapes_model_and_input_strings(tmp_path):
  tokens = ['<', 'script', '>', '"&\'']
  path = report.write_report(str(tmp_path / 'r.html'), title='t', text=XSS, tokens=tokens,
                             summary={'prediction': XSS}, scores={'grad_x_input': [0.1, 0.2, 0.3, 0.4]},
                             attention_XHLL=np.full((1, 1, 4, 4), 0.25), lens_rows=[
                                 {'layer': 'layer 0', 'top_ids': [0], 'top_probs': [1.0]}], decode=lambda i: XSS)
  page = open(path, encoding='utf-8').read()
  assert XSS not in page
  assert '&lt;script&gt;alert(1)&lt;/script&gt;' in page
  data = page.split('id="attn-data">')[1].split('</script>')[0]
  assert '<' not in data and json.loads(data)['tokens'] == tokens  # JSON in the script element stays inert
  assert 'http://' not in page and 'https://' not in page  # self-contained


@pytest.fixture(scope='module')
def moe_run(tmp_path_factory):
  config = dataclasses.replace(testing.TINY['mixtral'], vocab_size=257)  # the byte-level tokenizer's ids
  model = convert.Pretrained(config, testing.random_params(config), {}, testing.byte_level_tokenizer(), 'tiny moe')
  out = str(tmp_path_factory.mktemp('interpret'))
  text = f'a {XSS} b'
  result = pipeline.interpret(model, text, out, list(pipeline.METHODS), corrupt_text=f'a {XSS} c', ig_steps=8)
  return config, out, result, text


def test_pipeline_writes_every_view(moe_run):
  config, out, result, text = moe_run
  L = len(text.encode())
  attention_XHLL = np.load(os.path.join(out, 'attention.npy'))
  assert attention_XHLL.dtype == np.float32 and attention_XHLL.shape == (config.num_layers, config.num_heads, L, L)
  np.testing.assert_allclose(attention_XHLL.sum(-1), 1.0, rtol=1e-5)
  saved = json.load(open(os.path.join(out, 'interpret.json'), encoding='utf-8'))
  assert saved['tokens'] == list(text) and saved['target'] == saved['prediction']
  assert set(saved['scores']) == {'rollout', 'grad_x_input', 'integrated_gradients', 'occlusion'}
  assert all(len(v) == L for v in saved['scores'].values())
  assert saved['ig_completeness_gap'] >= 0.0
  assert len(saved['logit_lens']) == config.num_layers + 1 and saved['logit_lens'][-1]['target_rank'] == 0
  assert np.asarray(saved['patching']['scores']).shape == (config.num_layers, L)
  dla = saved['direct_logit_attribution']
  np.testing.assert_allclose(dla['total'], dla['logit'], rtol=1e-4, atol=1e-4)
  routed = saved['routing'][0]
  assert len(routed['top_expert']) == L and sum(len(v) for v in routed['tokens_per_expert'].values()) == 2 * L
  pngs = sorted(f for f in os.listdir(out) if f.endswith('.png'))
  assert len(pngs) == config.num_layers * config.num_heads + 4  # heads, rollout, patching, routing, attribution
  page = open(os.path.join(out, 'report.html'), encoding='utf-8').read()
  assert XSS not in page and '&lt;script&gt;alert(1)&lt;/script&gt;' in page
  assert page.count('data:image/png;base64,') == len(pngs)


def test_cli_rejects_bad_methods_in_one_line(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-m', 'experiments.interpret', f'--pretrained={tmp_path}', '--text=x',
                         '--methods=attention,telepathy', f'--output_dir={tmp_path}'], cwd=root, capture_output=True,
                        text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: --methods has unknown ['telepathy']; pick from " + ','.join(pipeline.METHODS)]


def test_classifier_explains_a_class_logit(tmp_path):
  from lmlab.finetune.tasks import FinetuneModel  # pylint: disable=g-import-not-at-top
  config = dataclasses.replace(testing.TINY['bert'], vocab_size=257)
  params = testing.random_params(config)  # an encoder's params include the BERT pooler
  rng = np.random.RandomState(1)
  params['classifier'] = {'kernel': rng.standard_normal((config.d_model, 3)).astype(np.float32),
                          'bias': rng.standard_normal(3).astype(np.float32)}
  model = convert.Pretrained(config, params, {}, testing.byte_level_tokenizer(), 'tiny classifier')
  result = pipeline.interpret(model, 'good film', str(tmp_path), ['grad_x_input'], label=2)
  ids = np.asarray([result['ids']])
  logits_BC, _ = FinetuneModel(config, num_classes=3, pooling='pooler').apply({'params': params}, ids, None,
                                                                              np.ones_like(ids))
  assert result['objective'] == 'class logit' and result['target'] == 2
  assert result['prediction'] == int(np.argmax(logits_BC[0]))
  np.testing.assert_allclose(result['target_score'], logits_BC[0, 2], rtol=1e-5, atol=1e-5)
  assert len(result['scores']['grad_x_input']) == len('good film')
  with pytest.raises(ValueError, match='out of range'):
    pipeline.interpret(model, 'good film', str(tmp_path), ['grad_x_input'], label=3)
  with pytest.raises(ValueError, match='--label'):
    pipeline.interpret(model, 'good film', str(tmp_path), ['grad_x_input'], target='a')
