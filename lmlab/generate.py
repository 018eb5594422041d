"""Text generation with a KV cache: one jitted prefill + `lax.while_loop` decode per input shape.

Prompts of different lengths are LEFT-padded to a common length P: every row then writes the same
cache slot at every step (one scalar index per layer, a plain dynamic_update_slice), and the last
prompt column holds every row's last real token, so prefill's last logits start all rows at once.
Padding carries segment id 0 and real tokens segment 1, so the packed-segment mask hides the padding;
positions count from each row's first real token, so RoPE sees exactly what an unpadded prompt gives.
The cache (flax `cache` collection, stacked over the scanned layers) holds only the G kv heads.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmlab.models import ModelConfig, Transformer


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is picked; temperature 0 is greedy (argmax)."""
  temperature: float = 0.0
  top_k: int = 0       # keep the k most likely tokens; 0: all
  top_p: float = 1.0   # keep the smallest set of tokens whose probability reaches top_p; 1: all

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f'sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {self}')


def sample_logits(logits_BV, rng, sampling: Sampling):
  """Next token per row: argmax at temperature 0, else a draw from the temperature/top-k/top-p filtered softmax."""
  logits_BV = logits_BV.astype(jnp.float32)
  if sampling.temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / sampling.temperature
  neg_inf = jnp.finfo(jnp.float32).min
  if sampling.top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, neg_inf, logits_BV)
  if sampling.top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # A token stays if the tokens ranked above it hold less than top_p: the most likely always stays.
    keep_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < sampling.top_p
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, neg_inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def left_pad(prompts: list[list[int]], pad_id: int, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """(tokens_BP, lengths_B): prompts right-aligned in P columns, P rounded up to `multiple` (fewer recompiles)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('every prompt needs at least one token; an empty prompt has nothing to continue from')
  P = -(-max(len(p) for p in prompts) // multiple) * multiple
  tokens_BP = np.full((len(prompts), P), pad_id, np.int32)
  for b, prompt in enumerate(prompts):
    tokens_BP[b, P - len(prompt):] = prompt
  return tokens_BP, np.array([len(p) for p in prompts], np.int32)


def init_cache(model: Transformer, variables, batch: int, length: int):
  """A zero KV cache for `batch` rows of up to `length` tokens; shapes come from eval_shape, nothing runs."""
  tokens_BS = jnp.zeros((batch, length), jnp.int32)
  shapes = jax.eval_shape(lambda v: model.apply(v, tokens_BS, mutable=['cache'])[1]['cache'], variables)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.lru_cache(maxsize=16)
def make_generate(config: ModelConfig, max_new_tokens: int, sampling: Sampling, eos_ids: tuple[int, ...],
                  pad_id: int):
  """Jitted (variables, tokens_BP, lengths_B, rng) -> (new tokens_BN, pad after EOS; generated count_B).

  Jitted once per (config, settings) and, through jax.jit's cache, once per input shape.
  """
  config = dataclasses.replace(config, remat='none', dropout=0.0)
  model = Transformer(config)
  N = max_new_tokens
  stop_E = jnp.asarray(eos_ids or (-1,), jnp.int32)

  def forward(variables, cache, tokens_BL, positions_BL, segment_ids_BL):
    (logits_BLV, _), mutated = model.apply({**variables, 'cache': cache}, tokens_BL, positions_BL, segment_ids_BL,
                                           mutable=['cache'])
    return logits_BLV[:, -1], mutated['cache']

  def run(variables, tokens_BP, lengths_B, rng):
    B, P = tokens_BP.shape
    if config.position == 'learned' and P + N > config.max_len:
      raise ValueError(f'prompt ({P}) + max_new_tokens ({N}) exceeds the model\'s {config.max_len} positions')
    pads_B1 = (P - lengths_B)[:, None]
    slots_P = jnp.arange(P)[None]
    segment_ids_BP = (slots_P >= pads_B1).astype(jnp.int32)
    positions_BP = jnp.maximum(slots_P - pads_B1, 0)
    logits_BV, cache = forward(variables, init_cache(model, variables, B, P + N), tokens_BP, positions_BP,
                               segment_ids_BP)
    rng, first_rng = jax.random.split(rng)

    def body(carry):
      i, cache, token_B, done_B, out_BN, count_B, rng = carry
      out_BN = out_BN.at[:, i].set(jnp.where(done_B, pad_id, token_B))
      count_B = count_B + (~done_B).astype(jnp.int32)
      done_B = done_B | jnp.isin(token_B, stop_E)
      logits_BV, cache = forward(variables, cache, token_B[:, None], (lengths_B + i)[:, None],
                                 jnp.ones((B, 1), jnp.int32))
      rng, step_rng = jax.random.split(rng)
      return i + 1, cache, sample_logits(logits_BV, step_rng, sampling), done_B, out_BN, count_B, rng

    cond = lambda carry: (carry[0] < N) & ~jnp.all(carry[3])
    init = (jnp.zeros((), jnp.int32), cache, sample_logits(logits_BV, first_rng, sampling), jnp.zeros((B,), bool),
            jnp.full((B, N), pad_id, jnp.int32), jnp.zeros((B,), jnp.int32), rng)
    _, _, _, _, out_BN, count_B, _ = jax.lax.while_loop(cond, body, init)
    return out_BN, count_B

  return jax.jit(run)


def generate(config: ModelConfig, variables, prompts: list[list[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), eos_ids: tuple[int, ...] = (), pad_id: int = 0,
             seed: int = 0) -> list[list[int]]:
  """New token ids per prompt (up to and including the first EOS).

  `variables`: everything the model applies with, {'params': ..., **model state} (lmlab.convert's
  Pretrained.variables): a sigmoid_bias MoE routes by its 'router_state' biases.
  """
  tokens_BP, lengths_B = left_pad(prompts, pad_id)
  fn = make_generate(config, max_new_tokens, sampling, tuple(eos_ids), pad_id)
  out_BN, count_B = jax.device_get(fn(variables, tokens_BP, lengths_B, jax.random.key(seed)))
  return [row[:n].tolist() for row, n in zip(out_BN, count_B)]


def stop_ids(tokenizer) -> tuple[int, ...]:
  """The tokenizer's EOS plus any other end-of-text/turn special tokens its vocabulary has."""
  from lmlab.data.tokenizers import EOS_TOKENS  # pylint: disable=g-import-not-at-top
  inner = getattr(tokenizer, 'tokenizer', None)
  ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
  if inner is not None and hasattr(inner, 'token_to_id'):
    ids |= {inner.token_to_id(t) for t in EOS_TOKENS + ('<|im_end|>',)} - {None}
  return tuple(sorted(ids))
