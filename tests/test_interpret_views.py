"""Attention rollout, the escaped HTML report (in headless Chromium too), the whole experiments.interpret pipeline on
a tiny MoE model for one input and for many, and the CLI on a classifier fine-tune's workdir with a --text_file."""
import contextlib
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import browser
from lmlab import convert
from lmlab.convert import testing
from lmlab.data.tokenizers import ByteTokenizer
from lmlab.interpret import attention_views, pipeline, report

XSS = '<script>alert(1)</script>'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
def moe_model():
  # The byte-level tokenizer's ids; 2 heads keep the per-head PNGs few.
  config = dataclasses.replace(testing.TINY['mixtral'], vocab_size=257, num_heads=2, num_kv_heads=1)
  return convert.Pretrained(config, testing.random_params(config), {}, testing.byte_level_tokenizer(), 'tiny moe')


@pytest.fixture(scope='module')
def moe_run(moe_model, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('interpret'))
  text = f'a {XSS} b'
  result = pipeline.interpret(moe_model, text, out, list(pipeline.METHODS), corrupt_text=f'a {XSS} c', ig_steps=8)
  return moe_model.config, out, result, text


@pytest.fixture(scope='module')
def moe_many(moe_model, moe_run, tmp_path_factory):
  """moe_run's input again, padded beside a longer one, with the views of one forward pass (the attribution methods'
  padding is tested in test_interpret_batch.py and test_interpret_attribution.py)."""
  out = str(tmp_path_factory.mktemp('interpret_many'))
  texts = [moe_run[3], f'{moe_run[3]} and <b>more</b>']
  return out, pipeline.interpret_many(moe_model, texts, out, ['attention', 'rollout', 'logit_lens', 'routing']), texts


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


def test_many_inputs_write_one_report_and_each_input_equals_its_run_alone(moe_run, moe_many):
  _, alone_dir, alone, _ = moe_run
  out, saved, texts = moe_many
  assert json.load(open(os.path.join(out, 'interpret.json'), encoding='utf-8')) == saved
  first, second = saved['inputs']
  assert [first['text'], second['text']] == texts and len(first['ids']) < len(second['ids'])  # first ran padded
  assert list(first) == [k for k in alone if k != 'patching' and not k.startswith('ig_')]
  for key in ('ids', 'tokens', 'position', 'target', 'prediction'):
    assert first[key] == alone[key], key
  np.testing.assert_allclose(first['target_score'], alone['target_score'], rtol=1e-5)
  np.testing.assert_allclose(first['scores']['rollout'], alone['scores']['rollout'], rtol=1e-5, atol=1e-7)
  assert [r['top_ids'] for r in first['logit_lens']] == [r['top_ids'] for r in alone['logit_lens']]
  for key, values in alone['direct_logit_attribution'].items():
    np.testing.assert_allclose(first['direct_logit_attribution'][key], values, rtol=1e-5, atol=1e-5, err_msg=key)
  for got, want in zip(first['routing'], alone['routing']):  # padding is never routed: same experts, entropies
    assert got['experts'] == want['experts']
    np.testing.assert_allclose(got['entropy'], want['entropy'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.load(os.path.join(out, 'attention.npy')),
                             np.load(os.path.join(alone_dir, 'attention.npy')), rtol=1e-5, atol=1e-7)
  pngs = sorted(f for f in os.listdir(out) if f.endswith('.png'))
  singles = [f for f in os.listdir(alone_dir) if f.endswith('.png') and f != 'patching.png']
  assert pngs == sorted(f'input{k}_{f}' for k in (1, 2) for f in singles)
  page = open(os.path.join(out, 'report.html'), encoding='utf-8').read()
  assert XSS not in page and '<b>' not in page and '&lt;b&gt;more&lt;/b&gt;' in page
  assert page.count('data:image/png;base64,') == len(pngs)
  assert '<h2>Input 1 of 2</h2>' in page and '<h2>Input 2 of 2</h2>' in page
  assert 'id="attn-data-1"' in page and 'id="attn-data-2"' in page and 'id="attn-data"' not in page


@contextlib.contextmanager
def chromium_page():
  """(page, dialogs, requests): headless Chromium recording both lists and flagging any call to alert (window.pwned)."""
  with browser.chromium() as chromium:
    page = chromium.new_page()
    dialogs, requests = [], []
    page.on('dialog', lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on('request', lambda request: requests.append(request.url))
    # The payload calls alert: it would both open a dialog and set this flag.
    page.add_init_script('window.pwned = false; const a = window.alert;'
                         'window.alert = (...x) => { window.pwned = true; return a.apply(window, x); };')
    yield page, dialogs, requests


def check_head_view(page, suffix: str, attention_XHLL, queries) -> None:
  """Hovering a query colours each token of the head view by the attention the page's numbers give it."""
  tokens = page.locator(f'#hv{suffix} .tok')
  assert tokens.count() == attention_XHLL.shape[-1]

  def alphas():  # the head view colours each token by the hovered query's attention to it (alpha 1: rgb)
    return tokens.evaluate_all('els => els.map(e => { const c = e.style.backgroundColor.match(/[0-9.]+/g);'
                               'return c.length === 4 ? +c[3] : 1; })')

  assert max(alphas()) == 0.0
  for layer, head, query in queries:
    page.select_option(f'#hv-layer{suffix}', str(layer))
    page.select_option(f'#hv-head{suffix}', str(head))
    tokens.nth(query).hover()
    np.testing.assert_allclose(alphas(), np.minimum(1.0, 1.5 * attention_XHLL[layer, head, query]), atol=5e-3)


def test_report_in_a_real_browser_runs_no_script_and_loads_nothing(moe_run):
  _, out, _, text = moe_run
  attention_XHLL = np.round(np.load(os.path.join(out, 'attention.npy')).astype(np.float64), 4)
  url = pathlib.Path(out, 'report.html').as_uri()
  with chromium_page() as (page, dialogs, requests):
    page.goto(url, wait_until='load')
    assert page.locator('code').first.inner_text() == text and page.locator('code').first.is_visible()
    assert page.get_by_text(XSS).first.is_visible()
    check_head_view(page, '', attention_XHLL, ((0, 0, len(text) - 1), (1, 1, 5)))
    assert not page.evaluate('window.pwned') and dialogs == []
    assert requests == [url]  # the page itself; images are inline data


def test_many_input_report_has_a_working_head_view_per_input(moe_many):
  out, saved, texts = moe_many
  url = pathlib.Path(out, 'report.html').as_uri()
  with chromium_page() as (page, dialogs, requests):
    page.goto(url, wait_until='load')
    assert page.locator('code').all_inner_texts() == texts
    first_XHLL = np.round(np.load(os.path.join(out, 'attention.npy')).astype(np.float64), 4)
    for k, (text, result) in enumerate(zip(texts, saved['inputs']), 1):
      # Each section's head view shows its own input (attention.npy holds the first one's).
      attention_XHLL = np.asarray(json.loads(page.locator(f'#attn-data-{k}').text_content())['attention'])
      assert attention_XHLL.shape[-1] == len(result['tokens']) == len(text)
      if k == 1:
        np.testing.assert_allclose(attention_XHLL, first_XHLL, atol=1e-12)
      check_head_view(page, f'-{k}', attention_XHLL, ((1, 0, len(text) - 1),))
    assert not page.evaluate('window.pwned') and dialogs == []
    assert requests == [url]


def test_cli_rejects_bad_methods_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'experiments.interpret', f'--pretrained={tmp_path}', '--text=x',
                         '--methods=attention,telepathy', f'--output_dir={tmp_path}'], cwd=ROOT, capture_output=True,
                        text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: --methods has unknown ['telepathy']; pick from " + ','.join(pipeline.METHODS)]


@pytest.fixture(scope='module')
def classifier_workdir(tmp_path_factory):
  """A one-step LoRA fine-tune of a tiny random BERT with the pooler head on a two-label jsonl."""
  from experiments.configs import base  # pylint: disable=g-import-not-at-top
  from lmlab.finetune import trainer  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('classifier')
  config = dataclasses.replace(testing.TINY['bert'], vocab_size=ByteTokenizer.vocab_size)
  convert.save(str(root / 'bert'), 'orbax', config, testing.random_params(config, seed=3), ByteTokenizer())
  with open(root / 'labels.jsonl', 'w', encoding='utf-8') as f:
    for i in range(16):
      f.write(json.dumps({'text': ('spam ' if i % 2 else 'ham ') * (1 + i % 3), 'label': 'odd' if i % 2 else 'even'})
              + '\n')
  c = base.get_base_config()
  c.init_from, c.finetune.task, c.finetune.dataset = str(root / 'bert'), 'classify', f'files:{root}/labels.jsonl'
  c.finetune.pooling, c.finetune.export, c.data.validation_fraction = 'pooler', False, 0.25
  c.batch_size, c.seq_len, c.steps, c.warmup_steps, c.progress = 8, 16, 1, 0, False
  c.checkpoint_every, c.eval_every, c.log_every = 1, 0, 1
  trainer.run(c, str(root / 'workdir'))
  return str(root / 'workdir')


def test_classifier_workdir_explains_a_text_file_through_the_cli(classifier_workdir, tmp_path):
  from lmlab.finetune.tasks import FinetuneModel  # pylint: disable=g-import-not-at-top
  texts = ['ham spam', 'spam spam ham <i>ham</i>']
  (tmp_path / 'inputs.txt').write_text(f'{texts[0]}\n\n{texts[1]}\n', encoding='utf-8')
  out = tmp_path / 'out'
  proc = subprocess.run([sys.executable, '-m', 'experiments.interpret', f'--workdir={classifier_workdir}',
                         f'--text_file={tmp_path / "inputs.txt"}', '--label=1', '--ig_steps=4',
                         '--methods=grad_x_input,integrated_gradients,occlusion', f'--output_dir={out}'], cwd=ROOT,
                        capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'attribution: inputs 1-2 of 2 done' in proc.stdout and 'input 2 of 2' in proc.stdout
  saved = json.load(open(out / 'interpret.json', encoding='utf-8'))['inputs']
  assert sorted(f for f in os.listdir(out) if f.endswith('.png')) == ['input1_attribution.png',
                                                                      'input2_attribution.png']
  model = convert.load_model(classifier_workdir)
  params = model.variables['params']
  assert sorted(k for k in params if k in ('classifier', 'pooler')) == ['classifier', 'pooler']
  analysed = dataclasses.replace(model.config, compute_dtype='float32')  # the run trained in bfloat16
  assert [s['text'] for s in saved] == texts and len(saved[0]['ids']) < len(saved[1]['ids'])
  for text, result in zip(texts, saved):  # each input alone through the fine-tuning model: the padded one too
    ids = np.asarray([result['ids']])
    assert result['ids'] == ByteTokenizer().encode(text)
    logits_BC, _ = FinetuneModel(analysed, num_classes=2, pooling='pooler').apply({'params': params}, ids, None,
                                                                                  np.ones_like(ids))
    assert result['objective'] == 'class logit' and result['target'] == 1 and result['target_name'] == 'class 1'
    assert result['prediction'] == int(np.argmax(logits_BC[0]))
    np.testing.assert_allclose(result['target_score'], logits_BC[0, 1], rtol=1e-5, atol=1e-5)
    assert all(len(result['scores'][m]) == ids.shape[1] for m in ('grad_x_input', 'integrated_gradients',
                                                                   'occlusion'))
  # A wrong target or label is refused before anything is compiled.
  with pytest.raises(ValueError, match='out of range'):
    pipeline.interpret(model, 'ham', str(tmp_path), ['grad_x_input'], label=2)
  with pytest.raises(ValueError, match='--label=N instead of --target'):
    pipeline.interpret(model, 'ham', str(tmp_path), ['grad_x_input'], target='a')
