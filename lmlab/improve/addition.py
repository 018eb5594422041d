"""Reversed multi-digit addition, the task of Self-Improving Transformers (Lee et al. 2025, arXiv 2502.01612).

Operands and sum are written least significant digit first ('321+654=' -> '975' for 123 + 456 = 579), so each
answer digit depends on the operand digits at the same place and the carry: the form the paper's small models
extend to longer numbers. Problems of `digits` digits have a longest operand of exactly that many digits.

With `width`, operands are zero-padded to `width` digits and the sum to width + 1 ('321000+654000=' -> '9750000'):
every answer digit then sits at the same distance from its operand digits whatever the problem's length, so a
longer problem needs no unseen relative positions, only digits where training showed zeros: a small RoPE model
on 2 CPU cores then generalises part of the way to one more digit, the regime the paper's loop builds on.
"""
import random


def problem(digits: int, rng: random.Random, width: int = 0) -> tuple[str, str]:
  """(question 'A+B=', reversed answer) with one operand of exactly `digits` digits, the other of 1 to `digits`;
  padded to `width` digits (the sum to width + 1) when width > 0."""
  if width and digits > width:
    raise ValueError(f'a {digits}-digit problem does not fit improve.pad_to={width}; raise pad_to to at least {digits}')
  longest = rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits)
  other = rng.randrange(0, 10 ** rng.randint(1, digits))
  a, b = (longest, other) if rng.random() < 0.5 else (other, longest)
  flip = lambda n, pad=0: str(n).zfill(pad)[::-1]
  if width:
    return f'{flip(a, width)}+{flip(b, width)}=', flip(a + b, width + 1)
  return f'{flip(a)}+{flip(b)}=', flip(a + b)


def problems(digit_counts: list[int], n: int, seed: int, width: int = 0) -> list[dict]:
  """n problems per digit count as {'prompt', 'answer', 'digits'}; distinct questions, seeded."""
  rng = random.Random(seed)
  rows = []
  for digits in digit_counts:
    seen = set()
    limit = min(n, (10 ** digits) * (10 ** digits) // 2)  # 1-digit sums have only so many distinct questions
    while len(seen) < limit:
      question, answer = problem(digits, rng, width)
      if question not in seen:
        seen.add(question)
        rows.append({'prompt': question, 'answer': answer, 'digits': digits})
  return rows
