"""Named reward functions: what each scores, and that a failing or non-numeric reward stops with the sample."""
import numpy as np
import pytest

from lmlab.finetune import reward_functions

ROWS = [{'answer': '42'}, {'answer': '42'}, {'answer': '1,000'}, {'answer': 'Paris'}]
PROMPTS = ['q'] * 4


def answer_length(prompt, completion, row):
  """A user reward for the module:function spec."""
  del prompt, row
  return len(completion)


def broken(prompt, completion, row):
  del prompt, row
  return None if completion == 'bad' else 1.0


def test_exact_match_and_numeric():
  completions = ['42', 'The answer is 42.', '1000', 'paris.']
  exact = reward_functions.make_reward_fn('exact_match')(PROMPTS, completions, ROWS)
  np.testing.assert_array_equal(exact, [1.0, 0.0, 1.0, 1.0])  # numbers by value, text case-folded
  numeric = reward_functions.make_reward_fn('numeric')(PROMPTS, completions, ROWS)
  np.testing.assert_array_equal(numeric, [1.0, 1.0, 1.0, 0.0])  # the last number, by value; 'paris.' has none


def test_format_matches_the_whole_completion():
  fn = reward_functions.make_reward_fn(r'format:<answer>\d+</answer>')
  np.testing.assert_array_equal(fn(['q'] * 3, ['<answer>7</answer>', 'so <answer>7</answer>', ' <answer>12</answer>\n'],
                                   [{}] * 3), [1.0, 0.0, 1.0])
  with pytest.raises(ValueError, match='not a valid regular expression'):
    reward_functions.make_reward_fn('format:(')


def test_user_function_by_module_and_name():
  fn = reward_functions.make_reward_fn('tests.test_reward_functions:answer_length')
  np.testing.assert_array_equal(fn(['q', 'q'], ['abc', ''], [{}, {}]), [3.0, 0.0])
  with pytest.raises(ValueError, match='cannot import nothing'):
    reward_functions.make_reward_fn('tests.test_reward_functions:nothing')
  with pytest.raises(ValueError, match="is not one of exact_match, numeric"):
    reward_functions.make_reward_fn('bleu')


def test_a_failing_or_non_numeric_reward_names_itself_and_the_sample():
  fn = reward_functions.make_reward_fn('tests.test_reward_functions:broken')
  with pytest.raises(ValueError, match=r"broken returned None for prompt 'q2', completion 'bad'"):
    fn(['q1', 'q2'], ['good', 'bad'], [{}, {}])
  with pytest.raises(ValueError, match=r"reward exact_match raised KeyError: 'answer' on prompt 'q'"):
    reward_functions.make_reward_fn('exact_match')(['q'], ['42'], [{'solution': '42'}])
