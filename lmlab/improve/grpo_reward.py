"""The loop's reward as a GRPO reward function: improve.method=grpo trains with grpo.rewards=stages.GRPO_REWARD.

GRPO calls `reward(prompt, completion, row)` for each completion it samples (lmlab/finetune/reward_functions.py's
module:function). The select stage wrote each row with the prompt's reference answer and `scoring`, the loop's scorer
settings (lmlab.improve.scorers.settings), so a completion is scored as the score stage scores a sample: cut at the
first stop string as the loop's generation cuts it, then the same rules, judge and reward model (loaded once per
process). The majority vote needs a prompt's other samples, which GRPO does not pass: the loop refuses it there.
"""
import functools
import json

from lmlab.improve import scorers, stages


@functools.lru_cache(maxsize=4)
def _scoring(settings_json: str):
  values = json.loads(settings_json)
  return scorers.build(values, lambda path: stages.load_model(path, values['compute_dtype']))


def reward(prompt: str, completion: str, row: dict) -> float:
  """The loop's automated reward of `completion` as the answer to `prompt`, in [0, 1]."""
  rules, judge, reward_model = _scoring(json.dumps(row['scoring'], sort_keys=True))
  text = completion
  for stop in stages.STOPS:
    text = text.split(stop)[0]
  sample = {'sample_id': 'grpo', 'prompt_id': 'grpo', 'question': prompt, 'answer': row.get('answer') or None,
            'text': text}
  return scorers.score([sample], rules, judge, reward_model)[0]['automated_reward']
