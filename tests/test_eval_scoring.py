"""Batched log-likelihood scoring: lm-eval's request rules (split, prefix, truncation, rolling windows) and
exactness against a plain unpadded forward whatever the batching or packing."""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from lmlab import sharding
from lmlab.convert import testing
from lmlab.data.tokenizers import HFTokenizer
from lmlab.eval import scoring
from lmlab.models import Transformer

TOKENIZER = testing.byte_level_tokenizer()  # no BOS: the prefix token is its EOS, id 256
CONFIG = dataclasses.replace(testing.TINY['llama'], vocab_size=TOKENIZER.vocab_size)
MAX_LEN = 16  # one row length (16) for every batch; requests are chosen so the reference compiles few lengths
# Inputs (after the split and lm-eval's truncation) of 8, 12 or 16 tokens: three truncated, one continuation of
# exactly max_len tokens, an empty context, a one-token continuation, multi-byte characters.
REQUESTS = [('Q: 2+2=', ' 4'), ('', 'hello th'), ('Answers:', 'B'), ('x' * 40, ' far away'), ('The cat ', 'sat on it.'),
            ('über ', 'naïve!'), ('one two three', ' four'), ('s', ' a longer ending'), ('Hi there!', ' you')]


@pytest.fixture(scope='module')
def variables():
  return {'params': testing.random_params(CONFIG)}


@pytest.fixture(scope='module')
def apply():
  return jax.jit(Transformer(CONFIG).apply)


@pytest.fixture(scope='module')
def reference(variables, apply):
  """Sum of log-probs and greedy flag of one request, from a single unpadded forward (lm-eval's truncation)."""

  def score(context_ids, continuation_ids):
    whole = list(context_ids) + list(continuation_ids)
    if len(whole) > MAX_LEN + 1:  # lm-eval: keep the last max_len + 1 tokens, the continuation whole
      whole = whole[len(whole) - MAX_LEN - 1:]
    logits = apply(variables, np.array([whole[:-1]], np.int32))[0][0]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1))
    rows = logp[len(whole) - 1 - len(continuation_ids):]
    return (float(sum(rows[i, t] for i, t in enumerate(continuation_ids))),
            all(int(np.argmax(rows[i])) == t for i, t in enumerate(continuation_ids)))

  return score


def _split(context, continuation):
  """The request split written out from lm-eval's `_encode_pair` and its empty-context rule (EOS prefix)."""
  if not context:
    return [TOKENIZER.eos_id], TOKENIZER.encode(continuation)
  stripped = context.rstrip()
  moved = context[len(stripped):] + continuation
  whole = TOKENIZER.encode(stripped + moved)
  return whole[:len(TOKENIZER.encode(stripped))], whole[len(TOKENIZER.encode(stripped)):]


def test_encode_pair_moves_trailing_space_and_prefixes_empty_contexts():
  assert scoring.encode_pair(TOKENIZER, 'The cat ', 'sat', 256) == (TOKENIZER.encode('The cat'),
                                                                   TOKENIZER.encode(' sat'))
  assert scoring.encode_pair(TOKENIZER, '', 'hi', 256) == ([256], TOKENIZER.encode('hi'))
  assert scoring.encode_pair(TOKENIZER, '', '<|endoftext|>hi', 256) == ([256], TOKENIZER.encode('hi'))
  for context, continuation in REQUESTS:
    assert scoring.encode_pair(TOKENIZER, context, continuation, 256) == _split(context, continuation)


def test_a_tokenizer_with_bos_prefixes_with_bos_once():
  """lm-eval's HF rule: BOS when the tokenizer has one; an empty context is [BOS] + the continuation encoded
  without special tokens, so a BOS the tokenizer adds by itself is not doubled."""
  with_bos = HFTokenizer(TOKENIZER.tokenizer, eos_id=256, bos_id=65, add_bos=True)  # 65: byte-level 'b'
  assert scoring.prefix_token(with_bos) == 65 and scoring.prefix_token(TOKENIZER) == 256
  assert scoring.encode_pair(with_bos, '', 'hi', 65) == ([65], TOKENIZER.encode('hi'))
  assert scoring.encode_pair(with_bos, 'a ', 'hi', 65) == ([65] + TOKENIZER.encode('a'), TOKENIZER.encode(' hi'))


def test_encode_pair_matches_lm_eval_template_lm():
  """lm-eval's own TemplateLM.loglikelihood builds the token requests that our split must equal."""
  model_api = pytest.importorskip('lm_eval.api.model', reason='lm-eval not installed')
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top

  class Recorder(model_api.TemplateLM):
    eot_token_id = TOKENIZER.eos_id

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
      return TOKENIZER.encode(string)

    def _loglikelihood_tokens(self, requests, **kwargs):
      return [(context, continuation) for _, context, continuation in requests]

    loglikelihood_rolling = generate_until = None

  requests = [Instance('loglikelihood', {}, r, i) for i, r in enumerate(REQUESTS)]
  expected = Recorder().loglikelihood(requests, disable_tqdm=True)
  assert [scoring.encode_pair(TOKENIZER, c, x, TOKENIZER.eos_id) for c, x in REQUESTS] == expected


def _windows_from_the_published_rule(ids, prefix, max_len):
  """lm-eval's rolling rule restated: the first window predicts ids[:max_len] after the prefix token; each next
  one predicts up to max_len more ids with every earlier id of its max_len-token input as context."""
  out, done = [], 0
  while done < len(ids):
    n = min(max_len, len(ids) - done)
    context = [prefix] if done == 0 else ids[max(0, done + n - max_len - 1):done]
    out.append((context, ids[done:done + n]))
    done += n
  return out


@pytest.mark.parametrize('n, max_len', [(0, 4), (1, 4), (4, 4), (5, 4), (9, 4), (13, 5), (40, 8), (7, 1), (3, 2)])
def test_rolling_windows_follow_lm_eval(n, max_len):
  ids = list(range(10, 10 + n))
  windows = scoring.rolling_windows(ids, 1, max_len)
  assert windows == _windows_from_the_published_rule(ids, 1, max_len)
  assert [t for _, continuation in windows for t in continuation] == ids  # every token scored once, in order
  utils = pytest.importorskip('lm_eval.utils', reason='lm-eval not installed')
  expected = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(ids, 1, max_len, 1)]
  assert windows == [(list(a), list(b)) for a, b in expected]


def test_truncate_left_cuts_the_context_and_keeps_the_continuation():
  assert scoring.truncate_left([1, 2, 3], [4, 5], max_len=8) == [1, 2, 3, 4]
  assert scoring.truncate_left([1, 2, 3, 4, 5, 6], [7, 8], max_len=4) == [4, 5, 6, 7]
  assert scoring.truncate_left([1], [2, 3, 4, 5], max_len=4) == [1, 2, 3, 4]


def test_bucket_lengths_are_powers_of_two_capped_at_max_len():
  assert [scoring.bucket_length(n, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
  assert scoring.bucket_length(20, 24) == 24 and scoring.bucket_length(5, 8) == 8


@pytest.mark.parametrize('pack', [True, False])
def test_plan_places_every_sequence_once_without_overlap(pack):
  lengths = [int(n) for n in np.random.RandomState(0).randint(1, 65, 50)]
  batches = scoring.plan_batches(lengths, batch_size=3, max_len=64, pack=pack)
  assert sorted(i for _, placed in batches for i, _, _ in placed) == list(range(50))
  for width, placed in batches:
    assert width in (16, 32, 64) and len(placed) >= 1
    rows = {}
    for i, row, offset in placed:
      rows.setdefault(row, []).append((offset, offset + lengths[i]))
    for spans in rows.values():
      spans.sort()
      assert spans[0][0] >= 0 and spans[-1][1] <= width
      assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
      assert pack or len(spans) == 1
  if pack:
    assert len(batches) < len(scoring.plan_batches(lengths, 3, 64, pack=False))


def test_scores_equal_a_plain_forward_in_every_batching(variables, reference):
  expected = [reference(*_split(c, x)) for c, x in REQUESTS]
  one_at_a_time = scoring.Scorer(CONFIG, variables, TOKENIZER, max_len=MAX_LEN, batch_size=1, pack=False)
  results = {'single': [one_at_a_time.loglikelihood([r])[0] for r in REQUESTS]}
  for batch_size in (1, 3, 8):
    for pack in (True, False):
      scorer = scoring.Scorer(CONFIG, variables, TOKENIZER, max_len=MAX_LEN, batch_size=batch_size, pack=pack)
      results[batch_size, pack] = scorer.loglikelihood(REQUESTS)
  for name, got in results.items():
    np.testing.assert_allclose([s for s, _ in got], [s for s, _ in expected], rtol=0, atol=1e-5, err_msg=str(name))
    assert [g for _, g in got] == [g for _, g in expected], name


def test_greedy_flag_is_true_when_the_continuation_is_the_argmax(variables, apply, reference):
  scorer = scoring.Scorer(CONFIG, variables, TOKENIZER, max_len=MAX_LEN, batch_size=3)
  context = TOKENIZER.encode('Greedy: ')
  continuation = []
  for _ in range(5):  # grow a continuation from the model's own argmax (right padding: causal, and one shape)
    ids = context + continuation
    logits = apply(variables, np.array([ids + [0] * (MAX_LEN - len(ids))], np.int32))[0]
    continuation.append(int(np.argmax(logits[0, len(ids) - 1])))
  wrong = continuation[:4] + [(continuation[4] + 1) % CONFIG.vocab_size]
  got = scorer.loglikelihood_tokens([(context, continuation), (context, wrong), (context, continuation[:1])])
  assert [g for _, g in got] == [True, False, True]
  np.testing.assert_allclose([s for s, _ in got], [reference(context, continuation)[0], reference(context, wrong)[0],
                                                   reference(context, continuation[:1])[0]], atol=1e-5)


def test_rolling_loglikelihood_scores_every_token_once(variables, reference):
  texts = ['', 'A short.', 'A text much longer than the window, so that several windows are needed. ' * 2]
  scorer = scoring.Scorer(CONFIG, variables, TOKENIZER, max_len=MAX_LEN, batch_size=3)
  got = scorer.loglikelihood_rolling(texts)
  expected = [sum(reference(c, x)[0] for c, x in _windows_from_the_published_rule(TOKENIZER.encode(t), 256, MAX_LEN))
              for t in texts]
  np.testing.assert_allclose(got, expected, atol=1e-4)
  assert got[0] == 0.0
  ids = TOKENIZER.encode(texts[1])  # shorter than the window: one forward of EOS + text scores every token
  assert abs(got[1] - reference([256], ids)[0]) < 1e-5


def test_scores_match_lm_eval_hf_backend(tmp_path, variables):
  """lm-eval's HFLM on the same weights (exported to a Hugging Face directory) gives the same numbers."""
  pytest.importorskip('torch', reason='the lm-eval reference needs torch (the [parity] extra)')
  huggingface = pytest.importorskip('lm_eval.models.huggingface', reason='lm-eval not installed')
  from lm_eval.api.instance import Instance  # pylint: disable=g-import-not-at-top
  from lmlab import convert  # pylint: disable=g-import-not-at-top
  convert.save_hf(str(tmp_path), CONFIG, variables['params'], TOKENIZER)
  # logits_cache=False: lm-eval's shared-prefix cache gathers the first (not last) positions when grouped
  # continuations differ in length, which would mis-score repeated rolling windows.
  lm = huggingface.HFLM(pretrained=str(tmp_path), device='cpu', dtype='float32', max_length=MAX_LEN, batch_size=4,
                        logits_cache=False)
  texts = ['Rolling windows over a text longer than sixteen tokens, scored by both.', 'Twelve bytes']
  scorer = scoring.Scorer(CONFIG, variables, TOKENIZER, max_len=MAX_LEN, batch_size=3)
  expected = lm.loglikelihood([Instance('loglikelihood', {}, r, i) for i, r in enumerate(REQUESTS)], disable_tqdm=True)
  got = scorer.loglikelihood(REQUESTS)
  np.testing.assert_allclose([s for s, _ in got], [s for s, _ in expected], atol=1e-4)
  assert [g for _, g in got] == [g for _, g in expected]
  expected = lm.loglikelihood_rolling([Instance('loglikelihood_rolling', {}, (t,), i) for i, t in enumerate(texts)],
                                      disable_tqdm=True)
  np.testing.assert_allclose(scorer.loglikelihood_rolling(texts), expected, atol=1e-4)


def test_batch_split_over_a_device_mesh_gives_the_same_scores(variables):
  mesh = sharding.make_mesh({'data': 8})
  sharded = scoring.Scorer(CONFIG, variables, TOKENIZER, max_len=MAX_LEN, batch_size=8, mesh=mesh)
  plain = scoring.Scorer(CONFIG, variables, TOKENIZER, max_len=MAX_LEN, batch_size=8)
  np.testing.assert_allclose([s for s, _ in sharded.loglikelihood(REQUESTS)],
                             [s for s, _ in plain.loglikelihood(REQUESTS)], atol=1e-5)
  with pytest.raises(ValueError, match='batch_size=3 is not divisible by the data-parallel size 8'):
    scoring.Scorer(CONFIG, variables, TOKENIZER, batch_size=3, mesh=mesh)


def test_learned_positions_and_router_state_in_packed_rows():
  """A MoE decoder with learned positions and a sigmoid-bias router: packed rows restart positions at every
  sequence (RoPE alone could not tell), and the router reads its bias from the 'router_state' collection."""
  moe = testing.TINY['mixtral'].moe
  config = dataclasses.replace(testing.TINY['mixtral'], vocab_size=TOKENIZER.vocab_size, position='learned',
                               moe=dataclasses.replace(moe, router='sigmoid_bias'))
  shapes = nn.unbox(jax.eval_shape(Transformer(config).init, jax.random.key(0), np.zeros((1, 4), np.int32)))
  bias = np.random.RandomState(1).standard_normal(shapes['router_state']['layers']['block_0']['moe']['bias'].shape)
  variables = {'params': testing.random_params(config),
               'router_state': {'layers': {'block_0': {'moe': {'bias': 3.0 * bias.astype(np.float32)}}}}}
  pairs = [('Answers:', 'B'), ('Q: 2+2=', ' 4'), ('The ca', 't s'), ('über', ' ok.')]  # 8-token inputs, 2 a row
  requests = [(TOKENIZER.encode(c), TOKENIZER.encode(x)) for c, x in pairs]
  got = scoring.Scorer(config, variables, TOKENIZER, max_len=MAX_LEN, batch_size=4).loglikelihood_tokens(requests)
  apply = jax.jit(Transformer(config).apply)
  for (context, continuation), (score, _) in zip(requests, got):
    logits = apply(variables, np.array([context + continuation[:-1]], np.int32))[0][0]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))[len(context) - 1:]
    assert abs(score - sum(logp[i, t] for i, t in enumerate(continuation))) < 1e-5


def test_bad_requests_are_refused(variables):
  scorer = scoring.Scorer(CONFIG, variables, TOKENIZER, max_len=8)
  with pytest.raises(ValueError, match='request 1 has no context tokens'):
    scorer.loglikelihood([('a', 'b'), ('   ', 'b')])
  with pytest.raises(ValueError, match='request 0 has 9 continuation tokens; score 1 to max_len=8'):
    scorer.loglikelihood_tokens([([1], list(range(3, 12)))])
  with pytest.raises(ValueError, match='request 0 has 0 continuation tokens'):
    scorer.loglikelihood([('a', '')])
  with pytest.raises(ValueError, match=r'request 1 has token ids outside the model\'s vocabulary \[0, 257\)'):
    scorer.loglikelihood_tokens([([1], [2]), ([1], [257])])
  with pytest.raises(ValueError, match='needs a causal decoder'):
    scoring.Scorer(testing.TINY['bert'], variables, TOKENIZER)
  with pytest.raises(ValueError, match='variables must be the dict flax applies'):
    scoring.Scorer(CONFIG, variables['params'], TOKENIZER)
