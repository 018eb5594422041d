"""Automated scorers of generated samples, each a value in [0, 1] per sample, and the reward they combine into.

Rules, 0 or 1:
  verifier      the sample is right: with match=exact its stripped text equals the prompt's reference answer (no
                numeric leniency, so a reversed '0001' is not '1'); with match=number the last number in it equals the
                answer in value (lmlab.eval.answers' flexible extraction: '12 + 7 = 19' is right for '19')
  majority      self-consistency (Lee et al. 2025; Wang et al. 2023): 1 when the sample agrees with the answer most
                of the prompt's K samples gave and that answer holds at least `min_share` of them; ties go to the
                answer seen first, so the vote is deterministic
  format        1 when the whole text matches `format_regex`
  length        1 when the text has at most `max_chars` characters
Graded scores, in [0, 1]:
  judge         the probability a judge model gives to a verdict ('Yes') right after a template showing the question
                and the sample (`Judge`): exp of the verdict's log-likelihood from lmlab.eval.scoring, split as
                lm-eval splits a request (whitespace ending the template goes with the verdict); with a contrast
                ('No'), the verdict's share of the two, p(verdict) / (p(verdict) + p(contrast)), which puts an
                undecided judge at 0.5 however much probability other words take
  reward_model  sigmoid(s) = 1 / (1 + exp(-s)) of the score s of a reward model (lmlab.rewards.RewardModel, a
                finetune.task=reward run): under its Bradley-Terry training, the probability that the sample is
                preferred to a reply scoring 0
The reward is the product of the rules times the mean of the graded scores (1 when there are none): a sample that
breaks a rule earns 0, any other sample its mean graded score. With rules alone it is ReST-EM's binary reward; with a
graded score, keep SFT's improve.threshold below 1. A human judgement, when present, replaces it (feedback.py).
"""
import collections
import dataclasses
import math
import re
from typing import Sequence

import numpy as np

from lmlab.eval import answers

RULES = ('verifier', 'majority', 'format', 'length')
GRADED = ('judge', 'reward_model')
SCORERS = RULES + GRADED
MATCHES = ('exact', 'number')


@dataclasses.dataclass(frozen=True)
class Rules:
  names: tuple[str, ...]
  min_share: float = 0.5
  format_regex: str = r'.+'
  max_chars: int = 64
  match: str = 'exact'

  def __post_init__(self):
    unknown = [n for n in self.names if n not in SCORERS]
    if unknown or not self.names:
      raise ValueError(f'improve.scorers={",".join(self.names)!r}: use a comma-separated subset of '
                       f'{", ".join(SCORERS)}')
    if not 0 < self.min_share <= 1:
      raise ValueError(f'improve.majority_min_share={self.min_share} must be in (0, 1]')
    if self.match not in MATCHES:
      raise ValueError(f'improve.match={self.match!r} is not one of {", ".join(MATCHES)}')
    try:
      re.compile(self.format_regex)
    except re.error as e:
      raise ValueError(f'improve.format_regex={self.format_regex!r} is not a regular expression ({e})') from None

  @property
  def graded(self) -> tuple[str, ...]:
    return tuple(n for n in self.names if n in GRADED)


def exact(text: str, answer: str) -> float:
  return float(text.strip() == answer.strip())


def correct(text: str, answer: str, match: str = 'exact') -> float:
  """1.0 when `text` answers `answer` under `match` (see the module docstring), else 0.0."""
  if match == 'number':
    return float(answers.answers_match(answers.extract_flexible(text), answer))
  return exact(text, answer)


def majority_vote(texts: list[str]) -> tuple[str, float]:
  """(the most common stripped text, its share of the votes); ties go to the one seen first."""
  counts = collections.Counter(t.strip() for t in texts)
  best = max(counts, key=lambda t: (counts[t], -[s.strip() for s in texts].index(t)))
  return best, counts[best] / len(texts)


class Judge:
  """P(verdict | the template filled with a question and a response) under a decoder (anything with .config,
  .variables, .tokenizer, such as lmlab.convert.Pretrained): batched, packed log-likelihoods of
  lmlab.eval.scoring, with its (context, continuation) split. With `chat`, the filled template is a user turn of the
  judge's chat template and the verdict opens its reply. With a `contrast`, the score is the verdict's share of the
  two continuations' probabilities."""

  def __init__(self, model, template: str, verdict: str, chat: bool = True, batch_size: int = 8,
               contrast: str = ''):
    from lmlab.eval import scoring  # pylint: disable=g-import-not-at-top  (jax: only when a judge is used)
    if '{question}' not in template or '{response}' not in template:
      raise ValueError(f'improve.judge_template={template!r} must show the question and the sample: put {{question}} '
                       'and {response} in it')
    try:
      template.format(question='', response='')
    except (KeyError, IndexError, ValueError) as e:
      raise ValueError(f'improve.judge_template={template!r} has a placeholder other than {{question}} and '
                       f'{{response}} ({e!r}); write a literal brace as {{{{ or }}}}') from None
    if not verdict.strip():
      raise ValueError('improve.judge_verdict is empty; give the continuation whose probability is the score, '
                       "e.g. ' Yes'")
    if contrast == verdict:
      raise ValueError(f'improve.judge_contrast={contrast!r} is the verdict itself; give its opposite (\'No\') or ""')
    self.model, self.template, self.verdict, self.chat, self.contrast = model, template, verdict, chat, contrast
    self.scorer = scoring.Scorer(model.config, model.variables, model.tokenizer, batch_size=batch_size)

  def context(self, question: str, response: str) -> str:
    from lmlab.finetune import chat  # pylint: disable=g-import-not-at-top
    text = self.template.format(question=question, response=response)
    if not self.chat:
      return text
    return chat.render(self.model.tokenizer, [{'role': 'user', 'content': text}], add_generation_prompt=True)

  def probabilities(self, questions: Sequence[str], responses: Sequence[str]) -> list[float]:
    contexts = [self.context(q, r) for q, r in zip(questions, responses)]
    continuations = [self.verdict] + ([self.contrast] if self.contrast else [])
    scored = [logp for logp, _ in self.scorer.loglikelihood([(c, v) for v in continuations for c in contexts])]
    verdict, contrast = scored[:len(contexts)], scored[len(contexts):]
    if not self.contrast:
      return [math.exp(logp) for logp in verdict]
    return sigmoid(np.subtract(verdict, contrast)).tolist()  # p_v / (p_v + p_c) = sigmoid(log p_v - log p_c)


def sigmoid(scores) -> np.ndarray:
  """1 / (1 + exp(-s)), computed as (1 + tanh(s / 2)) / 2 so that no exp overflows."""
  return 0.5 * (1.0 + np.tanh(np.asarray(scores, np.float64) / 2.0))


def graded_scores(name: str, samples: list[dict], judge: Judge | None, reward_model) -> list[float]:
  """The graded scorer `name`'s value per sample; a missing model or a non-finite value is a ValueError."""
  questions, texts = [s['question'] for s in samples], [s['text'].strip() for s in samples]
  if name == 'judge':
    if judge is None:
      raise ValueError('the judge scorer needs a Judge: pass judge= (scorers.build makes one from improve.judge)')
    values = judge.probabilities(questions, texts)
  else:
    if reward_model is None:
      raise ValueError('the reward_model scorer needs a reward model: pass reward_model= (scorers.build loads '
                       'improve.reward_model)')
    values = sigmoid(reward_model.score(questions, texts)).tolist()
  for s, value in zip(samples, values):
    if not math.isfinite(value):
      raise ValueError(f'scorer {name} gave {value} for sample {s["sample_id"]} ({s["text"]!r}); a diverged model? '
                       'scores must be finite')
  return values


def score(samples: list[dict], rules: Rules, judge: Judge | None = None, reward_model=None) -> list[dict]:
  """One row per sample: its id, each scorer's value, the vote's answer and share, and the reward."""
  by_prompt = collections.defaultdict(list)
  for s in samples:
    by_prompt[s['prompt_id']].append(s['text'])
  votes = {p: majority_vote(texts) for p, texts in by_prompt.items()}
  graded = {name: graded_scores(name, samples, judge, reward_model) for name in rules.graded}
  rows = []
  for index, s in enumerate(samples):
    text = s['text'].strip()
    winner, share = votes[s['prompt_id']]
    values = {}
    for name in rules.names:
      if name == 'verifier':
        if s.get('answer') is None:
          raise ValueError(f'sample {s["sample_id"]}: the verifier needs a reference answer and the prompt has none; '
                           'drop "verifier" from improve.scorers or give the pool answers')
        values[name] = correct(text, s['answer'], rules.match)
      elif name == 'majority':
        values[name] = float(text == winner and share >= rules.min_share)
      elif name == 'format':
        values[name] = float(re.fullmatch(rules.format_regex, text) is not None)
      elif name == 'length':
        values[name] = float(len(text) <= rules.max_chars)
      else:
        values[name] = graded[name][index]
    reward = 1.0
    for name in rules.names:
      if name in RULES:
        reward *= values[name]
    if rules.graded:
      reward *= sum(values[name] for name in rules.graded) / len(rules.graded)
    rows.append({'sample_id': s['sample_id'], 'prompt_id': s['prompt_id'], 'scores': values, 'vote': winner,
                 'vote_share': share, 'automated_reward': reward, 'reward': reward, 'source': 'automated'})
  return rows


def settings(config) -> dict:
  """The loop's scorer settings as plain JSON values (from a config with an `improve` section): what `build`
  takes, and what each GRPO prompt row carries so that training scores exactly as the score stage does."""
  i = config.improve
  return {'scorers': i.scorers, 'majority_min_share': i.majority_min_share, 'format_regex': i.format_regex,
          'max_chars': i.max_chars, 'match': i.match, 'judge': i.judge, 'judge_template': i.judge_template,
          'judge_verdict': i.judge_verdict, 'judge_contrast': i.judge_contrast, 'judge_chat': i.judge_chat,
          'reward_model': i.reward_model,
          'batch_size': i.batch_size, 'compute_dtype': config.model.compute_dtype}


def rules_of(values: dict) -> Rules:
  """The validated rules of `settings`, each graded scorer with its model's path (nothing is loaded)."""
  rules = Rules(tuple(n.strip() for n in values['scorers'].split(',') if n.strip()), values['majority_min_share'],
                values['format_regex'], values['max_chars'], values['match'])
  if 'judge' in rules.names and not values['judge']:
    raise ValueError('improve.scorers names judge but improve.judge is empty; set improve.judge=PATH (a GGUF file, '
                     'Hugging Face directory, lmlab export or workdir)')
  if 'reward_model' in rules.names and not values['reward_model']:
    raise ValueError('improve.scorers names reward_model but improve.reward_model is empty; set it to a '
                     'finetune.task=reward workdir or its export')
  return rules


def build(values: dict, load) -> tuple[Rules, Judge | None, object]:
  """(rules, judge, reward model) from `settings`; the judge (through `load(path) -> model`) and the reward model
  are loaded only when named."""
  rules = rules_of(values)
  judge = reward_model = None
  if 'judge' in rules.names:
    judge = Judge(load(values['judge']), values['judge_template'], values['judge_verdict'], values['judge_chat'],
                  values['batch_size'], values['judge_contrast'])
  if 'reward_model' in rules.names:
    from lmlab import rewards  # pylint: disable=g-import-not-at-top
    reward_model = rewards.RewardModel(values['reward_model'], batch_size=values['batch_size'])
  return rules, judge, reward_model
