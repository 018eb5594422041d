"""Default evaluation tasks that need no download, seeded: which docstring summary belongs to a standard-library
function (multiple choice, 4 choices) and what a small arithmetic expression evaluates to (generation).

The docstring task reuses the SFT questions of lmlab/finetune/data.py on their validation split, so a model
fine-tuned with the smollm2_sft preset is evaluated on functions it did not train on.
"""
import json
import os
import random

from lmlab.finetune import data

VALIDATION_FRACTION = 0.05  # the base config's data.validation_fraction: the split SFT holds out
NUM_CHOICES = 4
FEW_SHOT = (('3 + 4', '7'), ('10 - 6 * 1', '4'), ('2 * 5 + 1', '11'))  # shows the answer format


def docstring_choice_rows(n: int = 200, seed: int = 0) -> list[dict]:
  """`mc:` rows: context 'What does the Python function M.F do?\\nAnswer:', choices the true summary and three
  others drawn from the same split, the label's position drawn too."""
  records = data.stdlib_sft_records('validation', VALIDATION_FRACTION)
  summaries = sorted({r['response'] for r in records})
  rng = random.Random(seed)
  rows = []
  for record in rng.sample(records, min(n, len(records))):
    others = rng.sample([s for s in summaries if s != record['response']], NUM_CHOICES - 1)
    label = rng.randrange(NUM_CHOICES)
    choices = others[:label] + [record['response']] + others[label:]
    module = record['prompt'].split()[-2].split('.')[0]  # 'What does the Python function json.dumps do?' -> json
    rows.append({'context': f'{record["prompt"]}\nAnswer:', 'choices': choices, 'label': label, 'tags': [module]})
  return rows


def arithmetic_rows(n: int = 200, seed: int = 0) -> list[dict]:
  """`gen:` rows: three solved examples, then 'Q: What is a OP b [OP c]?\\nA:'; the answer a whole number. Tags
  give the number of operators; the default stop string ends the answer at the blank line."""
  rng = random.Random(seed)
  shots = ''.join(f'Q: What is {e}?\nA: {a}\n\n' for e, a in FEW_SHOT)
  rows = []
  for _ in range(n):
    terms = [rng.randint(0, 20) for _ in range(rng.choice((2, 3)))]
    ops = [rng.choice('+-*') for _ in terms[1:]]
    expression = str(terms[0]) + ''.join(f' {op} {t}' for op, t in zip(ops, terms[1:]))
    rows.append({'prompt': f'{shots}Q: What is {expression}?\nA:', 'answer': str(_value(terms, ops)),
                 'tags': [f'{len(ops)}_ops']})
  return rows


def _value(terms: list[int], ops: list[str]) -> int:
  """The expression's value with * before + and -, left to right otherwise."""
  apply = {'+': lambda x, y: x + y, '-': lambda x, y: x - y, '*': lambda x, y: x * y}
  if len(ops) == 2 and ops[1] == '*' and ops[0] != '*':
    return apply[ops[0]](terms[0], terms[1] * terms[2])
  value = terms[0]
  for op, t in zip(ops, terms[1:]):
    value = apply[op](value, t)
  return value


def write_tasks(out_dir: str, n: int = 200, seed: int = 0) -> dict[str, str]:
  """Writes docstring_mc.jsonl and arithmetic_gen.jsonl into out_dir; returns {task spec: number of rows}."""
  os.makedirs(out_dir, exist_ok=True)
  written = {}
  for kind, name, rows in (('mc', 'docstring_mc.jsonl', docstring_choice_rows(n, seed)),
                           ('gen', 'arithmetic_gen.jsonl', arithmetic_rows(n, seed))):
    path = os.path.join(out_dir, name)
    with open(path, 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(row, ensure_ascii=False) + '\n' for row in rows)
    written[f'{kind}:{path}'] = len(rows)
  return written
