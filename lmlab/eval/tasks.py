"""Evaluation tasks read from JSONL files: multiple choice (`mc:`), generation (`gen:`) and perplexity (`ppl:`).

Row formats (one JSON object per line; blank lines are skipped):
  mc:   {"context": str, "choices": [str, ...], "label": int, "tags": [str, ...]}   (tags optional)
        Choice j is scored as the continuation TARGET_DELIMITER + choices[j] of the context, and alone after the
        prefix token for acc_mutual_info: lm-evaluation-harness's multiple_choice requests.
  gen:  {"prompt": str, "answer": str, "tags": [...], "regex": str, "until": [str, ...]}   (the last three optional)
        The greedy output, cut at the first stop string (`until`, default STOP_STRINGS) or EOS, is matched against
        the answer under strict extraction (`regex`, default lm-eval's GSM8K '#### N') and flexible extraction
        (the last number); with num_samples > 1, that many sampled outputs give the unbiased pass@k.
  ppl:  {"text": str, "tags": [...]}: every token of each document scored once (rolling windows).

Each task gives (results, samples): results hold every metric, `n`, `model`, `task`, `fingerprint` (sha256 of the
file) and `slices`, the same metrics per tag ('tag=NAME') and per context-length bucket ('context_bytes=LO-HI'):
the UTF-8 bytes of the context, prompt or document, in the buckets of LENGTH_BUCKETS (bytes, not tokens, so two
models with different tokenizers slice alike). Samples are one row per example (its file `line`, `tags`,
`context_bytes` and what the kind scores). A bad row is one ValueError naming FILE:LINE, the problem and the fix.
"""
import dataclasses
import hashlib
import math
import os
import re

import numpy as np

from lmlab import generate as generate_lib
from lmlab.data import sources
from lmlab.eval import answers, choice_metrics, scoring, stats

KINDS = ('mc', 'gen', 'ppl')
TARGET_DELIMITER = ' '        # lm-eval's default between a multiple-choice context and each choice
STOP_STRINGS = ('\n\n',)      # where a generation ends unless the row gives `until`
LENGTH_BUCKETS = (64, 256, 1024, 4096)  # slice edges in UTF-8 bytes: [0, 64), [64, 256), ..., [4096, inf)
PASS_AT = (1, 5, 10, 100)     # pass@k reported for every k here up to num_samples


@dataclasses.dataclass(frozen=True)
class Settings:
  """How a task runs: scoring batch and length, generation budget and sampling, bootstrap size."""
  batch_size: int = 8
  max_len: int | None = None    # longest model input for scoring; None: Scorer's default
  max_new_tokens: int = 64
  num_samples: int = 1          # sampled generations per prompt for pass@k (besides the greedy one)
  temperature: float = 0.8      # of those samples
  seed: int = 0
  n_boot: int = 1000


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  kind: str
  path: str

  @property
  def name(self) -> str:
    return f'{self.kind}:{self.path}'


def parse_task(spec: str) -> TaskSpec:
  """'mc:FILE.jsonl' -> TaskSpec('mc', 'FILE.jsonl')."""
  kind, sep, path = spec.partition(':')
  if not sep or kind not in KINDS or not path:
    raise ValueError(f'task {spec!r} is not KIND:FILE.jsonl with KIND one of {", ".join(KINDS)} (e.g. mc:tasks.jsonl)')
  return TaskSpec(kind, path)


def fingerprint(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def read_rows(spec: TaskSpec) -> list[dict]:
  """The file's rows, checked for the kind's fields, each with its 1-based `line`."""
  if not os.path.isfile(spec.path):
    raise ValueError(f'task file {spec.path} does not exist; pass {spec.kind}:PATH to an existing JSONL file')
  rows = []
  for line_no, row in sources.jsonl_rows(spec.path):
    where = f'{spec.path}:{line_no}'
    if not isinstance(row, dict):
      raise ValueError(f'{where}: a row must be a JSON object, got {type(row).__name__}')
    rows.append({**_CHECKS[spec.kind](row, where), 'line': line_no})
  if not rows:
    raise ValueError(f'task file {spec.path} has no rows; write one JSON object per line')
  return rows


def _field(row: dict, key: str, kind, where: str, fix: str):
  if key not in row:
    raise ValueError(f'{where}: missing "{key}"; {fix}')
  if not isinstance(row[key], kind) or isinstance(row[key], bool):
    raise ValueError(f'{where}: "{key}" is {type(row[key]).__name__}; {fix}')
  return row[key]


def _strings(row: dict, key: str, where: str) -> list[str]:
  values = row.get(key, [])
  if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
    raise ValueError(f'{where}: "{key}" must be a list of strings, e.g. ["{key[:-1]}1"]')
  return values


def _check_mc(row: dict, where: str) -> dict:
  context = _field(row, 'context', str, where, 'give the text the choices continue, a string')
  choices = _field(row, 'choices', list, where, 'give the candidate answers, a non-empty list of strings')
  if not choices or not all(isinstance(c, str) and c for c in choices):
    raise ValueError(f'{where}: "choices" must be a non-empty list of non-empty strings; got {choices!r:.80}')
  label = _field(row, 'label', int, where, f'give the index of the correct choice, an integer 0 to {len(choices) - 1}')
  if not 0 <= label < len(choices):
    raise ValueError(f'{where}: "label" {label} is out of range for {len(choices)} choices; '
                     f'use 0 to {len(choices) - 1}')
  return {'context': context, 'choices': choices, 'label': label, 'tags': _strings(row, 'tags', where)}


def _check_gen(row: dict, where: str) -> dict:
  prompt = _field(row, 'prompt', str, where, 'give the text to continue, a string')
  answer = _field(row, 'answer', (str, int, float), where, 'give the reference answer, a string such as "42"')
  regex = row.get('regex')
  if regex is not None:
    try:
      re.compile(_field(row, 'regex', str, where, 'give a regular expression string, or leave "regex" out'))
    except re.error as e:
      raise ValueError(f'{where}: "regex" {regex!r} is not a valid regular expression ({e}); fix or drop it') from None
  until = _strings(row, 'until', where) if 'until' in row else list(STOP_STRINGS)
  return {'prompt': prompt, 'answer': str(answer), 'regex': regex, 'until': until, 'tags': _strings(row, 'tags', where)}


def _check_ppl(row: dict, where: str) -> dict:
  text = _field(row, 'text', str, where, 'give the document, a string')
  return {'text': text, 'tags': _strings(row, 'tags', where)}


_CHECKS = {'mc': _check_mc, 'gen': _check_gen, 'ppl': _check_ppl}


def length_bucket(n_bytes: int) -> str:
  """'LO-HI' (bytes, HI inclusive) of LENGTH_BUCKETS holding n_bytes; the last is 'LO+'."""
  edges = (0,) + LENGTH_BUCKETS
  i = int(np.searchsorted(LENGTH_BUCKETS, n_bytes, side='right'))
  return f'{edges[i]}+' if i == len(LENGTH_BUCKETS) else f'{edges[i]}-{edges[i + 1] - 1}'


def evaluate_task(model, spec: TaskSpec | str, settings: Settings = Settings()) -> tuple[dict, list[dict]]:
  """(results, samples) of one task under `model` (anything with .config, .variables, .tokenizer, .source, such
  as lmlab.convert.Pretrained)."""
  spec = parse_task(spec) if isinstance(spec, str) else spec
  if model.tokenizer is None:
    raise ValueError(f'{model.source} has no tokenizer to encode {spec.name} with')
  rows = read_rows(spec)
  samples = _RUNS[spec.kind](model, rows, settings)
  for row, sample in zip(rows, samples):
    context = row.get('context', row.get('prompt', row.get('text')))
    sample.update(task=spec.name, line=row['line'], tags=row['tags'], context_bytes=len(context.encode('utf-8')))
  results = {'task': spec.name, 'kind': spec.kind, 'model': model.source, 'fingerprint': fingerprint(spec.path),
             **summarize(spec.kind, samples, settings), 'slices': slices(spec.kind, samples, settings)}
  return results, samples


def summarize(kind: str, samples: list[dict], settings: Settings = Settings()) -> dict:
  """The kind's metrics over these samples (the whole task or one slice)."""
  return _SUMMARIES[kind](samples, settings)


def slices(kind: str, samples: list[dict], settings: Settings = Settings()) -> dict:
  """summarize() per tag and per context-length bucket, without the reliability diagram."""
  groups = {}
  for sample in samples:
    for key in [f'tag={t}' for t in sample['tags']] + [f'context_bytes={length_bucket(sample["context_bytes"])}']:
      groups.setdefault(key, []).append(sample)
  out = {}
  for key in sorted(groups):
    metrics = summarize(kind, groups[key], settings)
    metrics.pop('reliability', None)
    out[key] = metrics
  return out


def outcomes(kind: str, samples: list[dict]) -> dict[str, list[float]]:
  """Per-example values whose mean is each comparable metric: what a paired comparison resamples."""
  if kind == 'mc':
    names = [n for n in ('norm', 'bytes', 'mutual_info') if f'pred_{n}' in samples[0]]
    return {'acc': [float(s['correct']) for s in samples],
            **{f'acc_{n}': [float(s[f'pred_{n}'] == s['label']) for s in samples] for n in names}}
  if kind == 'gen':
    return {f'exact_match_{m}': [float(s['correct'][m]) for s in samples] for m in answers.MODES}
  return {'bits_per_byte': [s['bits_per_byte'] for s in samples]}  # per document: the document-averaged bpb


def make_scorer(model, settings: Settings) -> scoring.Scorer:
  return scoring.Scorer(model.config, model.variables, model.tokenizer, max_len=settings.max_len,
                        batch_size=settings.batch_size)


def _run_mc(model, rows: list[dict], settings: Settings) -> list[dict]:
  scorer = make_scorer(model, settings)
  pairs = [(r['context'], TARGET_DELIMITER + c) for r in rows for c in r['choices']]
  scored = scorer.loglikelihood(pairs + [('', continuation) for _, continuation in pairs])
  conditional, unconditional = scored[:len(pairs)], scored[len(pairs):]
  samples, start = [], 0
  for r in rows:
    end = start + len(r['choices'])
    chars, n_bytes = choice_metrics.choice_lengths(r['choices'])
    samples.append({'context': r['context'], 'choices': r['choices'], 'label': r['label'],
                    'logliks': [s for s, _ in conditional[start:end]],
                    'is_greedy': [g for _, g in conditional[start:end]],
                    'unconditional': [s for s, _ in unconditional[start:end]],
                    'choice_chars': chars, 'choice_bytes': n_bytes})
    start = end
  _, per_example = _mc_metrics(samples, settings)
  for sample, metrics in zip(samples, per_example):
    sample.update(metrics)
  return samples


def _mc_metrics(samples: list[dict], settings: Settings) -> tuple[dict, list[dict]]:
  return choice_metrics.multiple_choice_metrics(
      [s['logliks'] for s in samples], [s['label'] for s in samples], [s['choice_chars'] for s in samples],
      [s['choice_bytes'] for s in samples], [s['unconditional'] for s in samples], settings.n_boot, settings.seed)


def _summarize_mc(samples: list[dict], settings: Settings) -> dict:
  return _mc_metrics(samples, settings)[0]


def generate_texts(model, prompts: list[str], settings: Settings, sampling: generate_lib.Sampling,
                   stops: list[list[str]], seed: int = 0) -> list[str]:
  """Decoded continuations of `prompts`, each cut at its first stop string; batches of settings.batch_size rows
  (the last padded by repetition, so one batch shape compiles) of prompts sorted by length."""
  tokenizer = model.tokenizer
  ids = [tokenizer.encode(p) for p in prompts]
  eos = generate_lib.stop_ids(tokenizer)
  pad = tokenizer.pad_id if getattr(tokenizer, 'pad_id', None) is not None else 0
  order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
  texts = [''] * len(ids)
  for start in range(0, len(order), settings.batch_size):
    chunk = order[start:start + settings.batch_size]
    batch = [ids[i] for i in chunk]
    batch += [batch[-1]] * (settings.batch_size - len(batch))
    new = generate_lib.generate(model.config, model.variables, batch, settings.max_new_tokens, sampling, eos, pad,
                                seed + start)
    for i, tokens in zip(chunk, new):
      texts[i] = _cut(tokenizer.decode(tokens), stops[i])
  return texts


def _cut(text: str, stops: list[str]) -> str:
  ends = [text.find(s) for s in stops if s and s in text]
  return text[:min(ends)] if ends else text


def _run_gen(model, rows: list[dict], settings: Settings) -> list[dict]:
  prompts, stops = [r['prompt'] for r in rows], [r['until'] for r in rows]
  greedy = generate_texts(model, prompts, settings, generate_lib.Sampling(), stops, settings.seed)
  samples = []
  for r, output in zip(rows, greedy):
    extracted = {m: answers.extract_answer(output, m, r['regex'] if m == 'strict' else None) for m in answers.MODES}
    samples.append({'prompt': r['prompt'], 'answer': r['answer'], 'output': output, 'extracted': extracted,
                    'correct': {m: answers.answers_match(a, r['answer']) for m, a in extracted.items()}})
  if settings.num_samples > 1:
    k = settings.num_samples
    sampled = generate_texts(model, [p for p in prompts for _ in range(k)], settings,
                             generate_lib.Sampling(temperature=settings.temperature),
                             [s for s in stops for _ in range(k)], settings.seed + 1)
    for i, (r, sample) in enumerate(zip(rows, samples)):
      outputs = sampled[i * k:(i + 1) * k]
      sample['samples'] = outputs
      sample['num_correct'] = {m: int(sum(answers.exact_match(outputs, [r['answer']] * k, m,
                                                              r['regex'] if m == 'strict' else None)))
                               for m in answers.MODES}
  return samples


def _summarize_gen(samples: list[dict], settings: Settings) -> dict:
  out = {'n': len(samples)}
  for mode in answers.MODES:
    values = [float(s['correct'][mode]) for s in samples]
    out[f'exact_match_{mode}'] = float(np.mean(values))
    out[f'exact_match_{mode}_stderr'] = stats.bootstrap_stderr(values, n_boot=settings.n_boot, seed=settings.seed)
  if 'num_correct' in samples[0]:
    n = len(samples[0]['samples'])
    for mode in answers.MODES:
      for k in [k for k in PASS_AT if k <= n]:
        out[f'pass@{k}_{mode}'] = float(np.mean([stats.pass_at_k(n, s['num_correct'][mode], k) for s in samples]))
    out['num_samples'], out['temperature'] = n, settings.temperature
  return out


def _run_ppl(model, rows: list[dict], settings: Settings) -> list[dict]:
  texts = [r['text'] for r in rows]
  logliks = make_scorer(model, settings).loglikelihood_rolling(texts)
  samples = []
  for text, loglik in zip(texts, logliks):
    n_bytes = len(text.encode('utf-8'))
    samples.append({'loglik': loglik, 'tokens': len(model.tokenizer.encode(text)), 'bytes': n_bytes,
                    'words': len(text.split()), 'bits_per_byte': -loglik / math.log(2) / max(n_bytes, 1)})
  return samples


def _summarize_ppl(samples: list[dict], settings: Settings) -> dict:
  """Corpus totals, lm-eval's wikitext metrics: nats per token, perplexity, bits per byte, word/byte perplexity."""
  del settings
  nll = -sum(s['loglik'] for s in samples)
  tokens, n_bytes, words = (sum(s[k] for s in samples) for k in ('tokens', 'bytes', 'words'))
  if not tokens:
    raise ValueError('no tokens to score: every document of this perplexity task is empty')
  return {'n': len(samples), 'loss': nll / tokens, 'perplexity': math.exp(nll / tokens), 'tokens': tokens,
          'bytes': n_bytes, 'words': words, 'bits_per_byte': nll / math.log(2) / max(n_bytes, 1),
          'byte_perplexity': math.exp(nll / max(n_bytes, 1)), 'word_perplexity': math.exp(nll / max(words, 1))}


_RUNS = {'mc': _run_mc, 'gen': _run_gen, 'ppl': _run_ppl}
_SUMMARIES = {'mc': _summarize_mc, 'gen': _summarize_gen, 'ppl': _summarize_ppl}
