"""Answer extraction and exact match for generative tasks (GSM8K-style numbers, or answers a regex finds).

Extraction modes:
- strict: the first match of lm-eval's GSM8K pattern `#### (-?[0-9.,]+)`, or of a regex given by the caller or per
  row; the answer is the match's first capture group that took part (the whole match if it has no groups).
- flexible: the last number in the text. A number is an optional '-' right before the digits ('3-4' ends with
  -4), digits (thousands may be grouped by commas: '1,234,567' is one number, '1,2' two) and an optional decimal
  part; a period not followed by a digit ends it, so the full stop in 'is 42.' is not part of the number; '$' and
  other units are not part of it.
Either gives None when nothing matches, and None never matches a reference.

Matching (`answers_match`): both sides are stripped of surrounding whitespace, then
- if both read as numbers after dropping every ',', one leading '$' and one trailing '.', they match when their
  values are equal, exactly (decimal arithmetic): '1,000' == '1000.0' == '$1000.', '-0' == '0', '0.1' != '0.10001';
- otherwise the texts match after collapsing runs of whitespace to one space, dropping one trailing '.', and
  case folding: 'The  Answer.' == 'the answer'. Nothing else is normalised (no punctuation or article removal).
"""
import decimal
import re
from typing import Sequence

STRICT_PATTERN = r'#### (\-?[0-9\.\,]+)'  # lm-eval's gsm8k strict-match filter
NUMBER = re.compile(r'-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?')
PLAIN_NUMBER = re.compile(r'-?\d+(?:\.\d+)?')
MODES = ('strict', 'flexible')


def extract_strict(text: str, pattern: str | None = None) -> str | None:
  """The answer the strict pattern (default STRICT_PATTERN) finds first in `text`, stripped; None if none."""
  try:
    match = re.search(pattern or STRICT_PATTERN, text)
  except re.error as e:
    raise ValueError(f'answer pattern {pattern!r} is not a valid regular expression ({e})') from None
  if match is None:
    return None
  groups = [g for g in match.groups() if g is not None]
  return (groups[0] if groups else match.group(0)).strip()


def extract_flexible(text: str) -> str | None:
  """The last number in `text` as written ('1,000.5'); None if it has none."""
  numbers = NUMBER.findall(text)
  return numbers[-1] if numbers else None


def extract_answer(text: str, mode: str = 'strict', pattern: str | None = None) -> str | None:
  """`extract_strict` (with `pattern`) or `extract_flexible`, by mode."""
  if mode == 'strict':
    return extract_strict(text, pattern)
  if mode == 'flexible':
    if pattern is not None:
      raise ValueError('a pattern applies to strict extraction only; use mode="strict"')
    return extract_flexible(text)
  raise ValueError(f'answer extraction mode {mode!r} is not one of {", ".join(MODES)}')


def parse_number(text: str) -> decimal.Decimal | None:
  """The exact value of a text that is a number once stripped and rid of ',', a leading '$' and a trailing '.'."""
  text = text.strip().replace(',', '').removeprefix('$').removesuffix('.')
  return decimal.Decimal(text) if PLAIN_NUMBER.fullmatch(text) else None


def answers_match(answer: str | None, reference: str) -> bool:
  """Whether an extracted answer equals the reference under the module's matching rules."""
  if answer is None:
    return False
  a, r = parse_number(answer), parse_number(reference)
  if a is not None and r is not None:
    return a == r
  text = lambda s: ' '.join(s.split()).removesuffix('.').casefold()
  return text(answer) == text(reference)


def exact_match(outputs: Sequence[str], references: Sequence[str], mode: str = 'strict',
                patterns: str | Sequence[str | None] | None = None) -> list[float]:
  """1.0 or 0.0 per example: the answer extracted from each output matches its reference answer.

  `patterns`: one strict regex for every row, or one per row (None: the default pattern).
  """
  if len(outputs) != len(references):
    raise ValueError(f'{len(outputs)} outputs but {len(references)} references; give one reference per output')
  if patterns is None or isinstance(patterns, str):
    patterns = [patterns] * len(outputs)
  if len(patterns) != len(outputs):
    raise ValueError(f'{len(patterns)} patterns for {len(outputs)} outputs; give one per row or a single string')
  return [float(answers_match(extract_answer(o, mode, p), r)) for o, r, p in zip(outputs, references, patterns)]
