"""Exact batched log-likelihoods under a causal decoder, with lm-evaluation-harness's request semantics.

What is scored follows lm-eval's Hugging Face backend: the (context, continuation) split of `_encode_pair`,
the prefix token for an empty context, left truncation to `max_len`, and disjoint rolling windows for whole
texts. How it is scored is lmlab's own: sequences are sorted by length and packed several to a row (each its
own segment id, positions from 0, so attention never crosses sequences and each sees exactly what it would
alone), rows run through one jitted forward per (rows, bucketed length) shape, and only the continuation
tokens' float32 log-probs ([B, L], never [B, L, V]) come back to the host.

Exact for dense models and dropless MoE. A capacity-dispatch MoE drops tokens depending on what else is in
the row, so its scores depend on packing and batching (pass pack=False, batch_size=1 for one-at-a-time).
"""
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmlab import sharding
from lmlab.data.tokenizers import check_vocab
from lmlab.models import ModelConfig, Transformer

DEFAULT_MAX_LEN = 2048  # RoPE models carry no length limit; lm-eval's HF backend also falls back to 2048
MIN_BUCKET = 16         # shortest row length compiled: tiny requests share one shape


def prefix_token(tokenizer) -> int:
  """lm-eval's HF prefix rule: the tokenizer's BOS when it has one, else its EOS.

  It conditions an empty context and opens the first rolling window.
  """
  token = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
  if token is None:
    raise ValueError('the tokenizer has neither a BOS nor an EOS id to condition empty contexts on; '
                     'pass prefix_token_id')
  return token


def encode_pair(tokenizer, context: str, continuation: str, prefix_id: int) -> tuple[list[int], list[int]]:
  """(context_ids, continuation_ids) split as lm-eval does.

  Trailing whitespace of the context moves to the continuation; the continuation's ids are those of
  encode(context + continuation) past len(encode(context)). An empty context is the prefix token, unless
  the continuation's own first token already is that token (then it becomes the context).
  """
  if not context:
    ids = list(tokenizer.encode(continuation))
    if getattr(tokenizer, 'add_bos', False) and ids[:1] == [tokenizer.bos_id]:
      ids = ids[1:]  # lm-eval encodes this continuation with add_special_tokens=False
    return (ids[:1], ids[1:]) if ids[:1] == [prefix_id] else ([prefix_id], ids)
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
  whole = list(tokenizer.encode(context + continuation))
  context_ids = list(tokenizer.encode(context))
  return context_ids, whole[len(context_ids):]


def rolling_windows(ids: Sequence[int], prefix_id: int, max_len: int) -> list[tuple[list[int], list[int]]]:
  """(context, continuation) windows scoring every token of `ids` once: lm-eval's `get_rolling_token_windows`
  (context_len=1) followed by `make_disjoint_window`.

  The first window predicts ids[:max_len] from the prefix token; each later one predicts the next max_len
  ids (fewer at the end) from the ids before them, so after truncation every later input is max_len long.
  """
  ids = list(ids)
  windows, done = [], 0
  while done < len(ids):
    end = min(done + max_len, len(ids))
    context = [prefix_id] if done == 0 else ids[end - max_len - 1:done]
    windows.append((context, ids[done:end]))
    done = end
  return windows


def truncate_left(context_ids: Sequence[int], continuation_ids: Sequence[int], max_len: int) -> list[int]:
  """The model input for one request, lm-eval's rule: the last max_len + 1 tokens of context + continuation,
  minus the final one (the context is cut, the continuation kept); its last len(continuation) positions
  predict the continuation."""
  return (list(context_ids) + list(continuation_ids))[-(max_len + 1):][:-1]


def bucket_length(n: int, max_len: int) -> int:
  """Row length for a sequence of n tokens: the next power of two (at least MIN_BUCKET), at most max_len."""
  return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), max_len)


def plan_batches(lengths: Sequence[int], batch_size: int, max_len: int,
                 pack: bool = True) -> list[tuple[int, list[tuple[int, int, int]]]]:
  """Batches as (row length, [(sequence, row, offset), ...]), longest sequences first.

  A batch's row length is the bucket of its longest sequence; following sequences go first-fit into its
  `batch_size` rows (one per row unless `pack`), and the first that fits nowhere opens the next batch.
  """
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  batches, i = [], 0
  while i < len(order):
    width = bucket_length(lengths[order[i]], max_len)
    free = [width] * batch_size
    placed = []
    while i < len(order):
      n = lengths[order[i]]
      row = next((r for r in range(batch_size) if free[r] >= n and (pack or free[r] == width)), None)
      if row is None:
        break
      placed.append((order[i], row, width - free[row]))
      free[row] -= n
      i += 1
    batches.append((width, placed))
  return batches


@functools.lru_cache(maxsize=8)
def make_score_fn(config: ModelConfig):
  """Jitted (variables, tokens_BL, positions_BL, segment_ids_BL, targets_BL) -> (logp_BL, is_argmax_BL).

  logp_BL[b, l] is the float32 log-prob of targets_BL[b, l] after tokens up to l of the same segment;
  is_argmax_BL whether it is the argmax (the first one on ties, like torch's). Cached per config so
  every scorer of one model shares the compiled shapes.
  """
  model = Transformer(config)

  @jax.jit
  def score(variables, tokens_BL, positions_BL, segment_ids_BL, targets_BL):
    logits_BLV, _ = model.apply(variables, tokens_BL, positions_BL, segment_ids_BL)
    logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    logp_BL = jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
    return logp_BL, jnp.argmax(logp_BLV, axis=-1) == targets_BL

  return score


class Scorer:
  """lm-eval's `loglikelihood` and `loglikelihood_rolling` for one lmlab decoder, batched and packed.

  `variables` is the whole dict flax applies ({'params': ...} plus collections such as 'router_state').
  `max_len`: longest model input (default: the learned-position table, else DEFAULT_MAX_LEN).
  `batch_size`: rows per forward. `prefix_token_id`: default `prefix_token(tokenizer)`. With a `mesh`, rows
  are split over its data-parallel axes (batch_size must divide) under the logical `rules`; variables that
  are already jax arrays keep their placement, host arrays are replicated.
  """

  def __init__(self, config: ModelConfig, variables, tokenizer, max_len: int | None = None, batch_size: int = 8,
               pack: bool = True, prefix_token_id: int | None = None, mesh=None, rules=sharding.DEFAULT_RULES):
    if config.family != 'decoder':
      raise ValueError(f'log-likelihood scoring needs a causal decoder; this model is an {config.family}')
    if 'params' not in variables:
      raise ValueError(f'variables must be the dict flax applies, {{"params": ...}}; got keys {sorted(variables)}')
    check_vocab(config.vocab_size, tokenizer)
    self.max_len = max_len or (config.max_len if config.position == 'learned' else DEFAULT_MAX_LEN)
    if self.max_len < 1 or (config.position == 'learned' and self.max_len > config.max_len):
      raise ValueError(f'max_len={self.max_len} must be between 1 and the model\'s {config.max_len} learned positions')
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size} must be at least 1')
    if mesh is not None:
      sharding.check_batch_divides(batch_size, mesh)
    self.tokenizer, self.batch_size, self.pack, self.mesh, self.rules = tokenizer, batch_size, pack, mesh, rules
    self.vocab_size = config.vocab_size
    self.prefix_token_id = prefix_token(tokenizer) if prefix_token_id is None else prefix_token_id
    if mesh is None:
      place = lambda x: x if isinstance(x, jax.Array) else jax.device_put(x)
    else:  # arrays already spread over the mesh's devices keep their sharding (FSDP, tensor parallel)
      on_mesh = lambda x: isinstance(x, jax.Array) and x.sharding.device_set == set(mesh.devices.flat)
      place = lambda x: x if on_mesh(x) else jax.device_put(x, sharding.replicated(mesh))
    self.variables = jax.tree.map(place, variables)
    self._score = make_score_fn(config)

  def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probs, whether every continuation token is the argmax) per
    (context, continuation) string pair, in request order; split by `encode_pair`."""
    return self.loglikelihood_tokens([encode_pair(self.tokenizer, context, continuation, self.prefix_token_id)
                                      for context, continuation in requests])

  def loglikelihood_tokens(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
    """`loglikelihood` for already tokenized (context_ids, continuation_ids), truncated by `truncate_left`."""
    sequences = []
    for i, (context, continuation) in enumerate(requests):
      if not len(context):
        raise ValueError(f'request {i} has no context tokens (a whitespace-only context string moves into the '
                         'continuation); condition on a token, or pass the context string "" to use the prefix token')
      if not 0 < len(continuation) <= self.max_len:
        raise ValueError(f'request {i} has {len(continuation)} continuation tokens; score 1 to max_len={self.max_len}')
      ids = np.concatenate([np.asarray(context), np.asarray(continuation)])
      if ids.min() < 0 or ids.max() >= self.vocab_size:
        raise ValueError(f'request {i} has token ids outside the model\'s vocabulary [0, {self.vocab_size}); '
                         'were they made by another tokenizer?')
      sequences.append((truncate_left(context, continuation, self.max_len), list(continuation)))
    return self._score_sequences(sequences)

  def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
    """Sum of the log-probs of every token of each text (0 for an empty text), scored in `rolling_windows`.

    A text's ids are `tokenizer.encode(text)` as they are: a BOS the tokenizer adds is scored too, as in lm-eval.
    """
    windows, owners = [], []
    for t, text in enumerate(texts):
      pairs = rolling_windows(self.tokenizer.encode(text), self.prefix_token_id, self.max_len)
      windows += pairs
      owners += [t] * len(pairs)
    totals = np.zeros(len(texts))
    np.add.at(totals, np.asarray(owners, np.int64), [logp for logp, _ in self.loglikelihood_tokens(windows)])
    return totals.tolist()

  def _score_sequences(self, sequences: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """Scores (input ids, continuation) pairs: the continuation is predicted by the input's last positions."""
    totals, greedy = np.zeros(len(sequences)), np.ones(len(sequences), bool)
    pending = None
    for width, placed in plan_batches([len(x) for x, _ in sequences], self.batch_size, self.max_len, self.pack):
      tokens_BL, positions_BL, segments_BL, targets_BL = np.zeros((4, self.batch_size, width), np.int32)
      for segment, (i, row, offset) in enumerate(placed, start=1):  # segment 0 is padding
        inputs, continuation = sequences[i]
        end = offset + len(inputs)
        tokens_BL[row, offset:end] = inputs
        positions_BL[row, offset:end] = np.arange(len(inputs))
        segments_BL[row, offset:end] = segment
        targets_BL[row, end - len(continuation):end] = continuation
      outputs = self._forward(tokens_BL, positions_BL, segments_BL, targets_BL)
      if pending is not None:  # fetch the previous batch only once this one is queued: the device never waits
        self._collect(*pending, sequences, totals, greedy)
      pending = placed, outputs
    if pending is not None:
      self._collect(*pending, sequences, totals, greedy)
    return [(float(t), bool(g)) for t, g in zip(totals, greedy)]

  def _forward(self, *arrays_BL):
    if self.mesh is None:
      return self._score(self.variables, *arrays_BL)
    arrays_BL = jax.device_put(arrays_BL, sharding.batch_sharding(self.mesh))
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._score(self.variables, *arrays_BL)

  @staticmethod
  def _collect(placed, outputs, sequences, totals, greedy):
    logp_BL, is_argmax_BL = jax.device_get(outputs)
    for i, row, offset in placed:
      inputs, continuation = sequences[i]
      end = offset + len(inputs)
      totals[i] = np.sum(logp_BL[row, end - len(continuation):end], dtype=np.float64)
      greedy[i] = bool(np.all(is_argmax_BL[row, end - len(continuation):end]))
