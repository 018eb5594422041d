"""Multi-digit addition problems for the loop: reversed (the task of Self-Improving Transformers, Lee et al. 2025,
arXiv 2502.01612) or plain (for pretrained models, which read numbers the usual way round).

Reversed: operands and sum are written least significant digit first ('321+654=' -> '975' for 123 + 456 = 579), so
each answer digit depends on the operand digits at the same place and the carry: the form the paper's small models
extend to longer numbers. Plain: 'What is 123 + 456?' -> '579'. Problems of `digits` digits have a longest operand of
exactly that many digits; `question` places the operands as written ('{a}+{b}=').

With `width` (reversed only), operands are zero-padded to `width` digits and the sum to width + 1 ('321000+654000='
-> '9750000'): every answer digit then sits at the same distance from its operand digits whatever the problem's
length, so a longer problem needs no unseen relative positions, only digits where training showed zeros: a small
RoPE model on 2 CPU cores then generalises part of the way to one more digit, the regime the paper's loop builds on.
"""
import random

NOTATIONS = ('reversed', 'plain')


def problem(digits: int, rng: random.Random, width: int = 0, notation: str = 'reversed',
            question: str = '{a}+{b}=') -> tuple[str, str]:
  """(question, answer) with one operand of exactly `digits` digits, the other of 1 to `digits`; reversed operands
  padded to `width` digits (the sum to width + 1) when width > 0."""
  if width and digits > width:
    raise ValueError(f'a {digits}-digit problem does not fit improve.pad_to={width}; raise pad_to to at least {digits}')
  longest = rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits)
  other = rng.randrange(0, 10 ** rng.randint(1, digits))
  a, b = (longest, other) if rng.random() < 0.5 else (other, longest)
  if notation == 'plain':
    return question.format(a=a, b=b), str(a + b)
  flip = lambda n, pad=0: str(n).zfill(pad)[::-1]
  if width:
    return question.format(a=flip(a, width), b=flip(b, width)), flip(a + b, width + 1)
  return question.format(a=flip(a), b=flip(b)), flip(a + b)


def problems(digit_counts: list[int], n: int, seed: int, width: int = 0, notation: str = 'reversed',
             question: str = '{a}+{b}=') -> list[dict]:
  """n problems per digit count as {'prompt', 'answer', 'digits'}; distinct questions, seeded."""
  rng = random.Random(seed)
  rows = []
  for digits in digit_counts:
    seen = set()
    limit = min(n, (10 ** digits) * (10 ** digits) // 2)  # 1-digit sums have only so many distinct questions
    while len(seen) < limit:
      text, answer = problem(digits, rng, width, notation, question)
      if text not in seen:
        seen.add(text)
        rows.append({'prompt': text, 'answer': answer, 'digits': digits})
  return rows
