"""Perplexity and bits-per-byte of whole texts, with a sliding window for texts longer than the model's.

Convention (the Hugging Face perplexity guide, and `labels=input_ids`): every token after the first is
scored exactly once, as mean negative log-likelihood in nats. Windows of `window` tokens start every
`stride` tokens; each window scores only the tokens the previous one did not reach, so a token sees up
to window-1 tokens of context (at least window-stride). Windows run in fixed-shape batches through one
jitted forward; the last ones are padded with a separate segment id, which causal attention never lets
real tokens see.
"""
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmlab.models import ModelConfig, Transformer


def plan_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
  """(begin, end, first_target) per window: tokens[begin:end] go in, targets first_target..end-1 are scored."""
  if not 0 < stride < window:
    raise ValueError(f'stride={stride} must be between 1 and window-1={window - 1} so that consecutive windows '
                     'overlap and every token is scored')
  plan, prev_end = [], 0
  for begin in range(0, max(n_tokens - 1, 1), stride):
    end = min(begin + window, n_tokens)
    first = max(prev_end, begin + 1)
    if first < end:
      plan.append((begin, end, first))
    prev_end = end
    if end == n_tokens:
      break
  return plan


def make_window_nll(config: ModelConfig):
  """Jitted (variables, tokens_BW, segment_ids_BW) -> nll_BW of token w+1 given tokens <= w, float32."""
  model = Transformer(config)

  @jax.jit
  def window_nll(variables, tokens_BW, segment_ids_BW):
    logits_BWV, _ = model.apply(variables, tokens_BW, segment_ids_BL=segment_ids_BW)
    logp_BWV = jax.nn.log_softmax(logits_BWV[:, :-1].astype(jnp.float32), axis=-1)
    nll_BW = -jnp.take_along_axis(logp_BWV, tokens_BW[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(nll_BW, ((0, 0), (0, 1)))

  return window_nll


def score_tokens(config: ModelConfig, params, ids: Sequence[int], window: int, stride: int, batch_size: int = 8,
                 pad_id: int = 0, window_nll=None, progress: Callable[[int, int], None] | None = None,
                 model_state: dict | None = None):
  """(sum of NLL in nats, number of scored tokens) for one token sequence.

  `model_state`: the non-trainable collections the model applies with beside `params` (a sigmoid_bias MoE's
  router_state; lmlab.convert's Pretrained.model_state).
  """
  if config.family != 'decoder':
    raise ValueError(f'perplexity needs a causal decoder; this model is an {config.family}')
  ids = np.asarray(ids, np.int32)
  if config.position == 'learned' and window > config.max_len:
    raise ValueError(f'window={window} is longer than the model\'s {config.max_len} learned positions')
  window = min(window, max(len(ids), 2))
  stride = min(stride, window - 1)
  plan = plan_windows(len(ids), window, stride)
  window_nll = window_nll or make_window_nll(config)
  variables = {'params': params, **(model_state or {})}
  total, count = 0.0, 0
  for start in range(0, len(plan), batch_size):
    chunk = plan[start:start + batch_size]
    tokens_BW = np.full((batch_size, window), pad_id, np.int32)
    segments_BW = np.zeros((batch_size, window), np.int32)
    weights_BW = np.zeros((batch_size, window), np.float64)
    for b, (begin, end, first) in enumerate(chunk):
      tokens_BW[b, :end - begin] = ids[begin:end]
      segments_BW[b, :end - begin] = 1
      weights_BW[b, first - begin - 1:end - begin - 1] = 1.0  # position w predicts token w+1
    nll_BW = np.asarray(window_nll(variables, tokens_BW, segments_BW), np.float64)
    total += float(np.sum(nll_BW * weights_BW))
    count += int(weights_BW.sum())
    if progress is not None:
      progress(min(start + batch_size, len(plan)), len(plan))
  return total, count


def evaluate_texts(config: ModelConfig, params, tokenizer, texts: Sequence[str], window: int = 1024,
                   stride: int | None = None, batch_size: int = 8,
                   progress: Callable[[int, int], None] | None = None, model_state: dict | None = None) -> dict:
  """{'loss', 'perplexity', 'tokens', 'bytes', 'bits_per_byte', 'window', 'stride'} over `texts` (each scored alone).

  Bits per byte divides the summed NLL by the UTF-8 bytes of the scored tokens (every token after each text's
  first), whatever the tokenizer, so models with different vocabularies are comparable; 'bytes' counts those.
  """
  stride = stride or max(window // 2, 1)
  params, model_state = jax.device_put((params, model_state))
  window_nll = make_window_nll(config)
  pad_id = tokenizer.pad_id if getattr(tokenizer, 'pad_id', None) is not None else 0
  total, count, n_bytes = 0.0, 0, 0
  for text in texts:
    ids = tokenizer.encode(text)
    nll, n = score_tokens(config, params, ids, window, stride, batch_size, pad_id, window_nll, progress, model_state)
    # The first token is context, not predicted: its bytes stay out, like its nats (README: bits per byte).
    total, count, n_bytes = total + nll, count + n, n_bytes + int(tokenizer.byte_counts(ids)[1:].sum())
  if not count:
    raise ValueError('no tokens to score: every text encodes to fewer than two tokens')
  loss = total / count
  return {'loss': loss, 'perplexity': math.exp(loss), 'tokens': count, 'bytes': n_bytes,
          'bits_per_byte': total / math.log(2) / max(n_bytes, 1), 'window': window, 'stride': stride}
