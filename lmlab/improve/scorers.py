"""Automated scorers of generated samples, each a value in [0, 1] per sample, and the reward they combine into.

  verifier   1 when the sample's text equals the prompt's reference answer exactly (after stripping whitespace:
             no numeric leniency, so a reversed '0001' is not '1')
  majority   self-consistency (Lee et al. 2025; Wang et al. 2023): 1 when the sample agrees with the answer most
             of the prompt's K samples gave and that answer holds at least `min_share` of them; ties go to the
             answer seen first, so the vote is deterministic
  format     1 when the whole text matches `format_regex`
  length     1 when the text has at most `max_chars` characters
The reward is the product of the configured scorers: a sample earns 1 only when every rule passes (ReST-EM's
binary reward), and a human judgement, when present, replaces it (lmlab/improve/feedback.py).
"""
import collections
import dataclasses
import re

SCORERS = ('verifier', 'majority', 'format', 'length')


@dataclasses.dataclass(frozen=True)
class Rules:
  names: tuple[str, ...]
  min_share: float = 0.5
  format_regex: str = r'.+'
  max_chars: int = 64

  def __post_init__(self):
    unknown = [n for n in self.names if n not in SCORERS]
    if unknown or not self.names:
      raise ValueError(f'improve.scorers={",".join(self.names)!r}: use a comma-separated subset of '
                       f'{", ".join(SCORERS)}')
    if not 0 < self.min_share <= 1:
      raise ValueError(f'improve.majority_min_share={self.min_share} must be in (0, 1]')
    try:
      re.compile(self.format_regex)
    except re.error as e:
      raise ValueError(f'improve.format_regex={self.format_regex!r} is not a regular expression ({e})') from None


def exact(text: str, answer: str) -> float:
  return float(text.strip() == answer.strip())


def majority_vote(texts: list[str]) -> tuple[str, float]:
  """(the most common stripped text, its share of the votes); ties go to the one seen first."""
  counts = collections.Counter(t.strip() for t in texts)
  best = max(counts, key=lambda t: (counts[t], -[s.strip() for s in texts].index(t)))
  return best, counts[best] / len(texts)


def score(samples: list[dict], rules: Rules) -> list[dict]:
  """One row per sample: its id, each scorer's value, the vote's answer and share, and the reward."""
  by_prompt = collections.defaultdict(list)
  for s in samples:
    by_prompt[s['prompt_id']].append(s['text'])
  votes = {p: majority_vote(texts) for p, texts in by_prompt.items()}
  rows = []
  for s in samples:
    text = s['text'].strip()
    winner, share = votes[s['prompt_id']]
    values = {}
    for name in rules.names:
      if name == 'verifier':
        if s.get('answer') is None:
          raise ValueError(f'sample {s["sample_id"]}: the verifier needs a reference answer and the prompt has none; '
                           'drop "verifier" from improve.scorers or give the pool answers')
        values[name] = exact(text, s['answer'])
      elif name == 'majority':
        values[name] = float(text == winner and share >= rules.min_share)
      elif name == 'format':
        values[name] = float(re.fullmatch(rules.format_regex, text) is not None)
      else:
        values[name] = float(len(text) <= rules.max_chars)
    reward = 1.0
    for value in values.values():
      reward *= value
    rows.append({'sample_id': s['sample_id'], 'prompt_id': s['prompt_id'], 'scores': values, 'vote': winner,
                 'vote_share': share, 'automated_reward': reward, 'reward': reward, 'source': 'automated'})
  return rows
