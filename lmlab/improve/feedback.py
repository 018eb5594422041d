"""Human feedback files, DIR/feedback/*.jsonl: ratings, pairwise preferences and corrections of samples.

Rows (every one with "annotator", a non-empty string, and "time", ISO 8601 such as "2026-11-30T16:00:00Z"):
  rating      {"sample_id": "1:4:0", "rating": 1..5}
  preference  {"sample_ids": ["1:4:0", "1:4:2"], "preferred": "1:4:2"}
  correction  {"sample_id": "1:4:0", "corrected_text": "975"}
A bad row is one ValueError naming FILE:LINE. Conflicts are resolved by one rule: each annotator's LATEST row per
item counts (by time; a tie goes to the row read later, files in name order), then across annotators a sample's
human reward is the mean of their ratings mapped to [0, 1] ((rating - 1) / 4), a pair's preference is the majority
of their choices (a tie between annotators is no preference), and a sample's correction is the latest of all.
Where a person rated a sample, that reward replaces the automated one (`source: human`).
"""
import collections
import dataclasses
import datetime
import glob
import os

from lmlab.data import sources
from lmlab.improve import records

KINDS = ('rating', 'preference', 'correction')


@dataclasses.dataclass
class Feedback:
  ratings: dict = dataclasses.field(default_factory=dict)      # sample_id -> {annotator: rating}
  preferences: dict = dataclasses.field(default_factory=dict)  # (id, id) sorted -> preferred id
  corrections: dict = dataclasses.field(default_factory=dict)  # sample_id -> corrected text


def _time(value, where: str) -> datetime.datetime:
  if not isinstance(value, str):
    raise ValueError(f'{where}: "time" must be an ISO 8601 string such as "2026-11-30T16:00:00Z"')
  try:
    t = datetime.datetime.fromisoformat(value)
  except ValueError:
    raise ValueError(f'{where}: "time" {value!r} is not ISO 8601; write e.g. "2026-11-30T16:00:00Z"') from None
  return t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)


def _string(row: dict, key: str, where: str) -> str:
  value = row.get(key)
  if not isinstance(value, str) or not value:
    raise ValueError(f'{where}: "{key}" must be a non-empty string')
  return value


def check(row, where: str) -> tuple[str, dict]:
  """(kind, row) of one validated feedback row; ValueError naming `where` otherwise."""
  if not isinstance(row, dict):
    raise ValueError(f'{where}: a feedback row must be a JSON object')
  _string(row, 'annotator', where)
  _time(row.get('time'), where)
  if 'rating' in row:
    _string(row, 'sample_id', where)
    if not isinstance(row['rating'], int) or isinstance(row['rating'], bool) or not 1 <= row['rating'] <= 5:
      raise ValueError(f'{where}: "rating" must be an integer from 1 to 5; got {row["rating"]!r}')
    return 'rating', row
  if 'preferred' in row or 'sample_ids' in row:
    ids = row.get('sample_ids')
    if not isinstance(ids, list) or len(ids) != 2 or not all(isinstance(i, str) and i for i in ids) or \
        ids[0] == ids[1]:
      raise ValueError(f'{where}: "sample_ids" must be two different sample ids, e.g. ["1:4:0", "1:4:2"]')
    if row.get('preferred') not in ids:
      raise ValueError(f'{where}: "preferred" must be one of "sample_ids" {ids}')
    return 'preference', row
  if 'corrected_text' in row:
    _string(row, 'sample_id', where)
    if not isinstance(row['corrected_text'], str):
      raise ValueError(f'{where}: "corrected_text" must be a string')
    return 'correction', row
  raise ValueError(f'{where}: not a rating ("rating"), preference ("sample_ids", "preferred") or correction '
                   '("corrected_text") row')


def read(directory: str) -> list[tuple[str, dict, str]]:
  """(kind, row, 'FILE:LINE') of every row of DIRECTORY/*.jsonl, files in name order."""
  out = []
  for path in sorted(glob.glob(os.path.join(directory, '*.jsonl'))):
    for number, row in sources.jsonl_rows(path):
      where = f'{path}:{number}'
      kind, row = check(row, where)
      out.append((kind, row, where))
  return out


def load(directory: str) -> Feedback:
  """The resolved feedback of DIRECTORY (see the module docstring for the rule); empty when it does not exist."""
  latest = {}  # (kind, item, annotator) -> (time, order, row)
  for order, (kind, row, where) in enumerate(read(directory)):
    item = row['sample_id'] if kind != 'preference' else tuple(sorted(row['sample_ids']))
    key = (kind, item, row['annotator'])
    stamp = (_time(row['time'], where), order)
    if key not in latest or stamp >= latest[key][:2]:
      latest[key] = (*stamp, row)
  fb = Feedback()
  votes = collections.defaultdict(collections.Counter)
  newest_correction = {}
  for (kind, item, annotator), (t, order, row) in latest.items():
    if kind == 'rating':
      fb.ratings.setdefault(item, {})[annotator] = row['rating']
    elif kind == 'preference':
      votes[item][row['preferred']] += 1
    elif item not in newest_correction or (t, order) >= newest_correction[item][0]:
      newest_correction[item] = ((t, order), row['corrected_text'])
  for pair, counts in votes.items():
    (top, n), *rest = counts.most_common()
    if not rest or rest[0][1] < n:
      fb.preferences[pair] = top
  fb.corrections = {item: text for item, (_, text) in newest_correction.items()}
  return fb


def human_reward(ratings: dict[str, int]) -> float:
  return sum((r - 1) / 4 for r in ratings.values()) / len(ratings)


def apply(scores: list[dict], fb: Feedback) -> list[dict]:
  """Score rows with a person's rating in place of the automated reward where there is one."""
  out = []
  for row in scores:
    ratings = fb.ratings.get(row['sample_id'])
    if ratings:
      row = {**row, 'reward': human_reward(ratings), 'source': 'human', 'ratings': dict(sorted(ratings.items()))}
    out.append(row)
  return out


def corrections_as_sft(directory: str, samples: list[dict]) -> list[dict]:
  """SFT rows {prompt, response, sample_id} from the corrections of these samples."""
  fb = load(directory)
  return [{'prompt': s['question'], 'response': fb.corrections[s['sample_id']], 'sample_id': s['sample_id'],
           'source': 'correction'} for s in samples if s['sample_id'] in fb.corrections]


def preferences_as_pairs(directory: str, samples: list[dict]) -> list[dict]:
  """DPO rows {prompt, chosen, rejected} from the resolved preferences between two samples of the same prompt."""
  fb = load(directory)
  by_id = {s['sample_id']: s for s in samples}
  rows = []
  for (a, b), preferred in sorted(fb.preferences.items()):
    if a in by_id and b in by_id and by_id[a]['prompt_id'] == by_id[b]['prompt_id']:
      other = b if preferred == a else a
      rows.append({'prompt': by_id[a]['question'], 'chosen': by_id[preferred]['text'], 'rejected': by_id[other]['text'],
                   'chosen_id': preferred, 'rejected_id': other, 'source': 'preference'})
  return rows


def cohen_kappa(a: list[int], b: list[int]) -> float | None:
  """Cohen's kappa of two raters' binary labels; None when chance agreement is 1 (both constant and equal)."""
  if len(a) != len(b) or not a:
    raise ValueError('kappa needs two equally long, non-empty lists of labels')
  n = len(a)
  observed = sum(x == y for x, y in zip(a, b)) / n
  pa, pb = sum(a) / n, sum(b) / n
  chance = pa * pb + (1 - pa) * (1 - pb)
  return None if chance == 1 else (observed - chance) / (1 - chance)


def agreement(scores: list[dict], preferences: dict | None = None) -> dict:
  """Agreement of people with the automated reward, and between annotators.

  human_vs_automated: on the rated samples, a rating of 4 or 5 (mean across annotators) counts as good and an
  automated reward of at least 0.5 as good: the share of equal labels and Cohen's kappa (graded rewards included).
  preferences_vs_automated: on the resolved preferences between two scored samples, the share where the automated
  reward ranks the preferred sample higher, over the pairs it does not tie (ties counted apart): the pairwise
  agreement of a graded scorer with people. between_annotators: kappa on the samples two annotators both rated."""
  rated = [r for r in scores if r.get('ratings')]
  out = {'rated_samples': len(rated)}
  if rated:
    human = [int(human_reward(r['ratings']) >= 0.75) for r in rated]
    auto = [int(r['automated_reward'] >= 0.5) for r in rated]
    out['human_vs_automated'] = {'agreement': sum(h == a for h, a in zip(human, auto)) / len(rated),
                                 'kappa': cohen_kappa(human, auto)}
  automated = {r['sample_id']: r['automated_reward'] for r in scores}
  judged = [(automated[p], automated[a if p == b else b]) for (a, b), p in sorted((preferences or {}).items())
            if a in automated and b in automated]
  if judged:
    ranked = [(p, o) for p, o in judged if p != o]
    out['preferences_vs_automated'] = {'pairs': len(judged), 'ties': len(judged) - len(ranked),
                                       'agreement': sum(p > o for p, o in ranked) / len(ranked) if ranked else None}
  pairs = collections.defaultdict(lambda: ([], []))
  for r in rated:
    names = sorted(r['ratings'])
    for i, x in enumerate(names):
      for y in names[i + 1:]:
        pairs[(x, y)][0].append(int(r['ratings'][x] >= 4))
        pairs[(x, y)][1].append(int(r['ratings'][y] >= 4))
  out['between_annotators'] = {f'{x}|{y}': {'n': len(a), 'agreement': sum(p == q for p, q in zip(a, b)) / len(a),
                                            'kappa': cohen_kappa(a, b)} for (x, y), (a, b) in sorted(pairs.items())}
  return out


def append(directory: str, row: dict, name: str = 'review.jsonl') -> None:
  """Validates one row and appends it to DIRECTORY/NAME in a single write (safe with several writers)."""
  check(row, f'{name} (new row)')
  records.append_jsonl(os.path.join(directory, name), row)
