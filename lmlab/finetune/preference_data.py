"""Preference pairs {prompt, chosen, rejected} for DPO and reward models, read, checked and encoded as [2, L] rows.

Datasets (`finetune.dataset`):
  stdlib       offline: "What does the Python function X do?" with X's own docstring summary chosen over the
               next function's (in the SFT records' order), split like the SFT records.
  files:GLOB   .jsonl rows with finetune.prompt_key, 'chosen' and 'rejected' (strings).
A pair whose chosen equals its rejected teaches nothing and is skipped; so is one whose responses the sequence
length cuts off entirely. Both are counted (`PreferencePairs.skipped`), never silently dropped.
"""
import dataclasses

import numpy as np

from lmlab.finetune import chat, data

FIELDS = ('chosen', 'rejected')


def stdlib_records(split: str, validation_fraction: float) -> list[dict]:
  """The SFT questions with the true summary chosen and another function's summary rejected."""
  sft = data.stdlib_sft_records(split, validation_fraction)
  return [{'prompt': r['prompt'], 'chosen': r['response'], 'rejected': sft[(i + 1) % len(sft)]['response']}
          for i, r in enumerate(sft)]


def read_records(config, split: str) -> list[tuple[dict, str]]:
  """(record, where) of one split: where is file:line for jsonl rows, the dataset name otherwise."""
  spec = config.finetune.dataset
  if spec == 'stdlib':
    return [(r, f'stdlib:{i}') for i, r in enumerate(stdlib_records(split, config.data.validation_fraction))]
  if spec.startswith('files:'):
    return data.jsonl_records(spec[len('files:'):], split, config.data.validation_fraction, with_location=True)
  raise ValueError(f'finetune.dataset={spec!r} for preference pairs: use stdlib or files:GLOB '
                   '(jsonl rows with prompt, chosen and rejected)')


def text_field(record, key: str, where: str) -> str:
  if not isinstance(record, dict) or key not in record:
    raise ValueError(f'{where}: a preference row has no field {key!r}; every row needs prompt, chosen and rejected '
                     '(the prompt field is finetune.prompt_key)')
  if not isinstance(record[key], str):
    raise ValueError(f'{where}: field {key!r} is a {type(record[key]).__name__}, not a string')
  return record[key]


@dataclasses.dataclass
class PreferencePairs:
  """Encoded pairs of one split: per pair, (ids, response weights) of chosen and of rejected."""
  pairs: list[tuple[tuple[list[int], list[float]], tuple[list[int], list[float]]]]
  skipped: dict[str, int]


def encode(config, tokenizer, split: str) -> PreferencePairs:
  """Reads, checks and chat-encodes one split's pairs; identical and fully truncated pairs are skipped, counted."""
  prompt_key, L = config.finetune.prompt_key, config.seq_len
  pairs, skipped = [], {'identical': 0, 'truncated': 0}
  for record, where in read_records(config, split):
    prompt = text_field(record, prompt_key, where)
    chosen, rejected = (text_field(record, k, where) for k in FIELDS)
    if chosen == rejected:
      skipped['identical'] += 1
      continue
    encoded = tuple(chat.sft_example(tokenizer, prompt, response) for response in (chosen, rejected))
    # Row i predicts token i + 1 from tokens up to i: a response token is scored only if it lies within L + 1.
    if any(sum(weights[1:L + 1]) == 0 for _, weights in encoded):
      skipped['truncated'] += 1
      continue
    pairs.append(encoded)
  return PreferencePairs(pairs, skipped)


def pair_row(make_row, chosen, rejected) -> dict[str, np.ndarray]:
  """[2, L] arrays (chosen, rejected) from an SFT-style `make_row(ids, weights)`; the response mask moves to
  'response' and 'weights' becomes one per pair (what the train step normalises by)."""
  rows = [make_row(*chosen), make_row(*rejected)] if chosen else [make_row([], []), make_row([], [])]
  pair = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != 'weights'}
  pair['response'] = np.stack([r['weights'] for r in rows])
  pair['weights'] = np.float32(1.0 if chosen else 0.0)
  return pair
