"""Task files (mc:, gen:, ppl:) against plain forwards and hand-computed metrics; one-line errors naming the file's
line; slices; paired comparison of two models; the report with its reliability diagram and confusion matrix."""
import dataclasses
import hashlib
import json
import math

import jax
import numpy as np
import pytest

from lmlab import convert, generate
from lmlab.convert import testing
from lmlab.data.tokenizers import ByteTokenizer
from lmlab.eval import answers, compare, report, tasks
from lmlab.models import Transformer

TOKENIZER = testing.byte_level_tokenizer()  # no BOS: the prefix token is its EOS, id 256
CONFIG = dataclasses.replace(testing.TINY['llama'], vocab_size=TOKENIZER.vocab_size)
REFERENCE_LEN = 128
SETTINGS = tasks.Settings(batch_size=4, max_new_tokens=6, n_boot=200)
MC_ROWS = [{'context': 'Q: 2+2=', 'choices': ['4', 'five', '22'], 'label': 0, 'tags': ['math']},
           {'context': 'The cat sat on the', 'choices': ['mat', 'moon'], 'label': 1, 'tags': ['animals']},
           {'context': 'über' * 20, 'choices': ['naïve', 'plain', 'x', 'yes'], 'label': 3},
           {'context': 'Colour of the sky:', 'choices': ['blue', 'green'], 'label': 0, 'tags': ['math', 'sky']}]


@pytest.fixture(scope='module')
def model():
  return convert.Pretrained(CONFIG, testing.random_params(CONFIG), {}, TOKENIZER, 'tiny-a')


@pytest.fixture(scope='module')
def apply():
  return jax.jit(Transformer(CONFIG).apply)


def _logp_of(apply, model, context_ids, continuation_ids):
  """Sum of the continuation's log-probs from one forward of this sequence alone: the independent reference.

  Right padding to REFERENCE_LEN changes nothing before it (causal) and compiles one shape."""
  ids = list(context_ids) + list(continuation_ids)
  logits = apply(model.variables, np.array([ids[:-1] + [0] * (REFERENCE_LEN + 1 - len(ids))], np.int32))[0][0]
  logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1), np.float64)
  return sum(logp[len(context_ids) - 1 + i, t] for i, t in enumerate(continuation_ids))


def _write(path, rows):
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in rows))
  return path


def test_multiple_choice_task_scores_and_metrics(tmp_path, model, apply):
  path = _write(tmp_path / 'mc.jsonl', MC_ROWS[:2] + [''] + MC_ROWS[2:])  # a blank line is skipped, lines still count
  results, samples = tasks.evaluate_task(model, f'mc:{path}', SETTINGS)
  enc = TOKENIZER.encode
  for row, sample in zip(MC_ROWS, samples):
    # The byte-level tokenizer splits context and ' ' + choice exactly at the string boundary.
    expected = [_logp_of(apply, model, enc(row['context']), enc(' ' + c)) for c in row['choices']]
    unconditional = [_logp_of(apply, model, [256], enc(' ' + c)) for c in row['choices']]
    np.testing.assert_allclose(sample['logliks'], expected, atol=1e-4)
    np.testing.assert_allclose(sample['unconditional'], unconditional, atol=1e-4)
    assert sample['pred'] == int(np.argmax(expected)) and sample['label'] == row['label']
    assert sample['correct'] == (sample['pred'] == row['label'])
    assert sample['pred_norm'] == int(np.argmax(np.array(expected) / [len(c) for c in row['choices']]))
    assert sample['pred_mutual_info'] == int(np.argmax(np.array(expected) - unconditional))
    assert sample['choice_bytes'] == [len(c.encode()) for c in row['choices']]
    assert len(sample['is_greedy']) == len(row['choices'])
  assert [s['line'] for s in samples] == [1, 2, 4, 5]
  acc = [float(s['pred'] == s['label']) for s in samples]
  assert results['n'] == 4 and results['acc'] == np.mean(acc) and results['task'] == f'mc:{path}'
  assert results['acc_norm'] == np.mean([s['pred_norm'] == s['label'] for s in samples])
  assert results['model'] == 'tiny-a' and results['fingerprint'] == hashlib.sha256(path.read_bytes()).hexdigest()
  for key in ('acc_bytes', 'acc_mutual_info', 'brier', 'ece', 'acc_stderr', 'reliability'):
    assert key in results, key
  slices = results['slices']
  assert set(slices) == {'tag=math', 'tag=animals', 'tag=sky', 'context_bytes=0-63', 'context_bytes=64-255'}
  assert slices['tag=math']['n'] == 2 and slices['tag=math']['acc'] == (acc[0] + acc[3]) / 2
  assert slices['context_bytes=64-255']['n'] == 1 and slices['context_bytes=64-255']['acc'] == acc[2]  # 100 bytes
  assert 'reliability' not in slices['tag=math']


def test_length_buckets():
  assert [tasks.length_bucket(n) for n in (0, 63, 64, 255, 256, 4095, 4096, 10 ** 6)] == [
      '0-63', '0-63', '64-255', '64-255', '256-1023', '1024-4095', '4096+', '4096+']


@pytest.mark.parametrize('line, message', [
    ('{"context": "a", "choices": ["b", "c"]}', ':2: missing "label"; give the index of the correct choice'),
    ('{"context": "a", "choices": ["b", "c"], "label": 2}', ':2: "label" 2 is out of range for 2 choices; use 0 to 1'),
    ('{"context": "a", "choices": [], "label": 0}', ':2: "choices" must be a non-empty list of non-empty strings'),
    ('{"context": "a", "choices": ["b"], "label": true}', ':2: "label" is bool; give the index'),
    ('{"context": "a", "choices": ["b"], ', ':2: malformed JSON .*; write one JSON object per line'),
    ('{"choices": ["b"], "label": 0}', ':2: missing "context"; give the text the choices continue'),
    ('{"context": "a", "choices": ["b"], "label": 0, "tags": "x"}', ':2: "tags" must be a list of strings'),
    ('[1, 2]', ':2: a row must be a JSON object, got list'),
])
def test_bad_multiple_choice_rows_name_file_and_line(tmp_path, line, message):
  path = _write(tmp_path / 'bad.jsonl', [MC_ROWS[0], line])
  with pytest.raises(ValueError, match=f'^{str(path)}{message}'):
    tasks.read_rows(tasks.parse_task(f'mc:{path}'))


def test_bad_generation_and_perplexity_rows_and_specs(tmp_path):
  path = _write(tmp_path / 'gen.jsonl', [{'prompt': 'p', 'answer': '1'}, {'prompt': 'p'}])
  with pytest.raises(ValueError, match=f'^{path}:2: missing "answer"; give the reference answer'):
    tasks.read_rows(tasks.parse_task(f'gen:{path}'))
  path = _write(tmp_path / 'gen2.jsonl', [{'prompt': 'p', 'answer': '1', 'regex': '(unclosed'}])
  with pytest.raises(ValueError, match=f'^{path}:1: "regex" .* is not a valid regular expression'):
    tasks.read_rows(tasks.parse_task(f'gen:{path}'))
  path = _write(tmp_path / 'ppl.jsonl', [{'txt': 'oops'}])
  with pytest.raises(ValueError, match=f'^{path}:1: missing "text"; give the document'):
    tasks.read_rows(tasks.parse_task(f'ppl:{path}'))
  with pytest.raises(ValueError, match='is not KIND:FILE.jsonl'):
    tasks.parse_task('qa:x.jsonl')
  with pytest.raises(ValueError, match='does not exist'):
    tasks.read_rows(tasks.parse_task(f'mc:{tmp_path / "missing.jsonl"}'))


def test_generation_task_exact_match_and_pass_at_k(tmp_path, model):
  prompts = ['Q: 1+1=', 'Once up', 'x']  # at most 8 tokens: one prompt-length bucket, one compile per batch shape
  # The reference: each prompt in a batch of its own copies (the task's batch shape), greedy, cut at the stop string.
  alone = [TOKENIZER.decode(generate.generate(CONFIG, model.variables, [TOKENIZER.encode(p)] * 4, 6,
                                              eos_ids=(256,), pad_id=256)[0]).split('\n\n')[0] for p in prompts]
  rows = [{'prompt': prompts[0], 'answer': alone[0][:2], 'regex': '^(..)', 'tags': ['t']},  # strict: right
          {'prompt': prompts[1], 'answer': alone[1][:2] + 'zz', 'regex': '^(..)'},         # strict: wrong
          {'prompt': prompts[2], 'answer': '7'}]                                           # default #### pattern
  path = _write(tmp_path / 'gen.jsonl', rows)
  settings = dataclasses.replace(SETTINGS, num_samples=4, temperature=1.0)
  results, samples = tasks.evaluate_task(model, f'gen:{path}', settings)
  assert [s['output'] for s in samples] == alone
  assert [s['correct']['strict'] for s in samples] == [True, False, False]
  flexible = [answers.answers_match(answers.extract_flexible(o), r['answer']) for o, r in zip(alone, rows)]
  assert [s['correct']['flexible'] for s in samples] == flexible
  assert results['exact_match_strict'] == pytest.approx(1 / 3)
  assert results['exact_match_flexible'] == pytest.approx(np.mean(flexible))
  for r, s in zip(rows, samples):
    assert len(s['samples']) == 4
    c = sum(answers.answers_match(answers.extract_strict(o, r.get('regex')), r['answer']) for o in s['samples'])
    assert s['num_correct']['strict'] == c
  pass_1 = np.mean([s['num_correct']['strict'] / 4 for s in samples])  # pass@1 is the mean per-sample accuracy
  assert results['pass@1_strict'] == pytest.approx(pass_1)
  unbiased = lambda c: 1 - math.comb(4 - c, 2) / math.comb(4, 2)
  assert tasks.stats.pass_at_k(4, 1, 2) == pytest.approx(unbiased(1))
  assert 'pass@5_strict' not in results and results['num_samples'] == 4


def test_perplexity_task_per_document_and_totals(tmp_path, model, apply):
  docs = [{'text': 'A first document.', 'tags': ['short']}, {'text': 'Second, a little longer document here.'}]
  results, samples = tasks.evaluate_task(model, f'ppl:{_write(tmp_path / "ppl.jsonl", docs)}', SETTINGS)
  expected = [_logp_of(apply, model, [256], TOKENIZER.encode(d['text'])) for d in docs]  # EOS prefix, every token
  np.testing.assert_allclose([s['loglik'] for s in samples], expected, atol=1e-4)
  tokens = sum(len(d['text'].encode()) for d in docs)
  assert results['tokens'] == results['bytes'] == tokens and results['words'] == 9
  assert results['loss'] == pytest.approx(-sum(expected) / tokens, abs=1e-6)
  assert results['bits_per_byte'] == pytest.approx(-sum(expected) / math.log(2) / tokens, abs=1e-6)
  assert results['word_perplexity'] == pytest.approx(math.exp(-sum(expected) / 9), rel=1e-5)
  assert samples[0]['bits_per_byte'] == pytest.approx(-expected[0] / math.log(2) / len(docs[0]['text']), rel=1e-5)
  assert results['slices']['tag=short']['n'] == 1


def test_a_model_compared_with_itself_differs_by_zero_with_p_one(tmp_path, model):
  path = _write(tmp_path / 'mc.jsonl', MC_ROWS)
  out = report.evaluate_to_files(model, [tasks.parse_task(f'mc:{path}')], SETTINGS, None, None, other=model)
  comparison = out['compare']['tasks'][f'mc:{path}']['comparison']
  assert out['compare']['tokenizers'] == 'same'
  for name in ('acc', 'acc_norm', 'acc_bytes', 'acc_mutual_info'):
    c = comparison[name]
    assert (c['difference'], c['ci_low'], c['ci_high'], c['p_value'], c['n']) == (0.0, 0.0, 0.0, 1.0, 4), name


def test_models_with_different_tokenizers_each_score_with_their_own(tmp_path, model, apply):
  config_b = dataclasses.replace(CONFIG, vocab_size=ByteTokenizer.vocab_size)
  model_b = convert.Pretrained(config_b, testing.random_params(config_b, seed=1), {}, ByteTokenizer(), 'tiny-b')
  path = _write(tmp_path / 'mc.jsonl', MC_ROWS * 3)
  out = report.evaluate_to_files(model, [tasks.parse_task(f'mc:{path}')], SETTINGS, str(tmp_path / 's.jsonl'),
                                 None, other=model_b)
  assert out['compare']['tokenizers'] == 'different' and 'different tokenizers' in out['compare']['note']
  samples = [json.loads(line) for line in (tmp_path / 's.jsonl').read_text().splitlines()]
  samples_b = [s for s in samples if s['model'] == 'tiny-b']
  apply_b = jax.jit(Transformer(config_b).apply)
  row = MC_ROWS[1]  # model B's own ids: bytes shifted by 3, prefix its EOS (1)
  expected = [_logp_of(apply_b, model_b, ByteTokenizer().encode(row['context']), ByteTokenizer().encode(' ' + c))
              for c in row['choices']]
  np.testing.assert_allclose(samples_b[1]['logliks'], expected, atol=1e-4)
  acc_a = np.array([s['correct'] for s in samples if s['model'] == 'tiny-a'], float)
  acc_b = np.array([s['correct'] for s in samples_b], float)
  c = out['compare']['tasks'][f'mc:{path}']['comparison']['acc']
  assert c['difference'] == pytest.approx(acc_a.mean() - acc_b.mean())
  only_a, only_b = int(np.sum(acc_a > acc_b)), int(np.sum(acc_b > acc_a))
  n = only_a + only_b  # McNemar's exact p: two-sided binomial tail at 1/2 on the discordant pairs
  p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, j) for j in range(min(only_a, only_b) + 1)) / 2 ** n)
  assert c['p_value'] == pytest.approx(p) and (c['a_only'], c['b_only']) == (only_a, only_b)


def test_report_lists_worst_examples_and_draws_the_plots(tmp_path, model):
  path = _write(tmp_path / 'mc.jsonl', MC_ROWS)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'summary.json').write_text(json.dumps({'eval_confusion': json.dumps([[3, 1], [0, 4]])}))
  finetuned = dataclasses.replace(model, source=f'{workdir} step 3', metadata={'finetune': {'labels': ['a', 'b']}})
  out_dir = tmp_path / 'out'
  out_dir.mkdir()
  out = report.evaluate_to_files(finetuned, [tasks.parse_task(f'mc:{path}')], SETTINGS, str(out_dir / 's.jsonl'),
                                 str(out_dir / 'report.md'))
  text = (out_dir / 'report.md').read_text()
  wrong = [s for s in map(json.loads, (out_dir / 's.jsonl').read_text().splitlines()) if not s['correct']]
  assert f'| acc | {out["tasks"][f"mc:{path}"]["acc"]:.4f} |' in text
  assert text.count('chose another by') == len(wrong)
  assert 'Worst slices by acc' in text and '| tag=math | 2 |' in text
  for png in ('confusion.png', f'reliability_{report._slug(f"mc:{path}")}.png'):
    assert (out_dir / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', png
    assert f']({png})' in text
