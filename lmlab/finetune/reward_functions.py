"""Named reward functions for GRPO and the self-improvement loop: a spec string -> rewards of sampled completions.

  exact_match        1 when the completion matches the row's 'answer' under lmlab.eval.answers' rules, else 0
  numeric            1 when the last number in the completion equals the 'answer' in value, else 0
  format:REGEX       1 when REGEX matches the whole (stripped) completion, else 0
  reward_model:PATH  the score of the reward model at PATH (lmlab.rewards; a finetune.task=reward run or export)
  module:function    your own `function(prompt, completion, row) -> number`, imported by name
Every reward is checked: a function that raises or returns something other than a finite number stops the run
with its name and the offending sample, rather than training on a silent 0.
"""
import importlib
import math
import numbers
import re
from typing import Callable, Sequence

import numpy as np

from lmlab.eval import answers

BUILTIN = ('exact_match', 'numeric', 'format:REGEX', 'reward_model:PATH', 'module:function')


def _exact_match(prompt: str, completion: str, row: dict) -> float:
  del prompt
  return float(answers.answers_match(completion, str(row['answer'])))


def _numeric(prompt: str, completion: str, row: dict) -> float:
  del prompt
  return float(answers.answers_match(answers.extract_flexible(completion), str(row['answer'])))


def _format(pattern: str):
  try:
    compiled = re.compile(pattern, re.DOTALL)
  except re.error as error:
    raise ValueError(f'reward format:{pattern} is not a valid regular expression ({error})') from None
  return lambda prompt, completion, row: float(compiled.fullmatch(completion.strip()) is not None)


def _imported(spec: str):
  module_name, _, name = spec.partition(':')
  try:
    function = getattr(importlib.import_module(module_name), name)
  except (ImportError, AttributeError) as error:
    raise ValueError(f'reward {spec}: cannot import {name} from {module_name} ({error}); '
                     f'use one of {", ".join(BUILTIN)}') from None
  if not callable(function):
    raise ValueError(f'reward {spec} is not callable')
  return function


def _checked(spec: str, value, prompt: str, completion: str) -> float:
  if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
    return float(value)
  raise ValueError(f'reward {spec} returned {value!r} for prompt {prompt!r}, completion {completion!r}; '
                   'a reward must be a finite number')


def make_reward_fn(spec: str) -> Callable[[Sequence[str], Sequence[str], Sequence[dict]], np.ndarray]:
  """(prompts, completions, rows) -> float32 rewards [N] for the reward named by `spec` (see the module docstring)."""
  if spec.startswith('reward_model:'):
    from lmlab import rewards  # pylint: disable=g-import-not-at-top  (loads a model: only when asked for)
    model = rewards.RewardModel(spec[len('reward_model:'):])

    def score(prompts, completions, rows):
      del rows
      values = model.score(prompts, completions)
      for value, prompt, completion in zip(values, prompts, completions):
        _checked(spec, value, prompt, completion)  # a diverged reward model gives NaN: stop, do not train on it
      return values.astype(np.float32)
    return score
  if spec == 'exact_match':
    function = _exact_match
  elif spec == 'numeric':
    function = _numeric
  elif spec.startswith('format:'):
    function = _format(spec[len('format:'):])
  elif ':' in spec:
    function = _imported(spec)
  else:
    raise ValueError(f'reward {spec!r} is not one of {", ".join(BUILTIN)}')

  def each(prompts, completions, rows):
    out = []
    for prompt, completion, row in zip(prompts, completions, rows):
      try:
        value = function(prompt, completion, row)
      except Exception as error:  # pylint: disable=broad-except  (any failure names the sample, then stops)
        raise ValueError(f'reward {spec} raised {type(error).__name__}: {error} on prompt {prompt!r}, completion '
                         f'{completion!r}') from error
      out.append(_checked(spec, value, prompt, completion))
    return np.asarray(out, np.float32)
  return each
