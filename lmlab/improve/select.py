"""Training data from scored samples: rejection sampling for SFT (ReST-EM), best-vs-worst pairs for DPO, and the
round's prompts for GRPO (which samples and scores its own completions while it trains)."""
import collections


def _by_prompt(samples: list[dict], scores: list[dict]) -> dict:
  reward = {s['sample_id']: s['reward'] for s in scores}
  groups = collections.OrderedDict()
  for s in samples:
    groups.setdefault(s['prompt_id'], []).append((s, reward[s['sample_id']]))
  return groups


def rejection(samples: list[dict], scores: list[dict], threshold: float, per_prompt: int) -> list[dict]:
  """SFT rows {prompt, response, sample_id}: per prompt, up to `per_prompt` distinct texts whose reward is at least
  `threshold`, highest reward first, then in sampling order (a stable sort: the same input gives the same rows)."""
  if per_prompt < 1:
    raise ValueError(f'improve.max_per_prompt={per_prompt} must be at least 1')
  rows = []
  for group in _by_prompt(samples, scores).values():
    kept, texts = 0, set()
    for s, r in sorted(group, key=lambda sr: -sr[1]):
      text = s['text'].strip()
      if r >= threshold and text not in texts and kept < per_prompt:
        texts.add(text)
        kept += 1
        rows.append({'prompt': s['question'], 'response': text, 'sample_id': s['sample_id']})
  return rows


def preference_pairs(samples: list[dict], scores: list[dict], margin: float) -> list[dict]:
  """DPO rows {prompt, chosen, rejected, ...}: per prompt the best sample against the worst, when their rewards differ
  by at least `margin` and their texts differ (first in sampling order among equals)."""
  if margin <= 0:
    raise ValueError(f'improve.dpo_margin={margin} must be positive: equal rewards say nothing about preference')
  rows = []
  for group in _by_prompt(samples, scores).values():
    best = max(group, key=lambda sr: sr[1])
    worst = min(group, key=lambda sr: sr[1])
    if best[1] - worst[1] >= margin and best[0]['text'].strip() != worst[0]['text'].strip():
      rows.append({'prompt': best[0]['question'], 'chosen': best[0]['text'].strip(),
                   'rejected': worst[0]['text'].strip(), 'chosen_id': best[0]['sample_id'],
                   'rejected_id': worst[0]['sample_id']})
  return rows


def prompts(samples: list[dict], scoring: dict) -> list[dict]:
  """GRPO rows {prompt, answer, scoring, prompt_id}: each prompt of the round once, in sampling order, with the
  loop's scorer settings (lmlab/improve/grpo_reward.py rewards its completions by them; '' when it has no answer)."""
  rows = {}
  for s in samples:
    rows.setdefault(s['prompt_id'], {'prompt': s['question'], 'answer': s.get('answer') or '', 'scoring': scoring,
                                     'prompt_id': s['prompt_id']})
  return list(rows.values())
