"""Log-probabilities of given tokens under a language model's logits, from lmlab.train.losses' one cross-entropy.

DPO and GRPO score responses by their summed (or per-token) log-probabilities with prompt tokens weighted 0;
`vmap` over single tokens turns the summed cross-entropy into a per-token one without a second implementation
(under jit the unused z and accuracy outputs are dropped).
"""
import jax
import jax.numpy as jnp

from lmlab.train import losses


def token_logprobs(logits_xLV, targets_xL) -> jax.Array:
  """log p(target) at every position, float32, for any leading axes (x) before [L, V]."""
  V = logits_xLV.shape[-1]
  targets_T = targets_xL.reshape(-1)
  nll_T, _, _ = jax.vmap(losses.token_cross_entropy)(logits_xLV.reshape(-1, V), targets_T,
                                                     jnp.ones(targets_T.shape, jnp.float32))
  return -nll_T.reshape(targets_xL.shape)


def sequence_logprobs(logits_xLV, targets_xL, weights_xL) -> jax.Array:
  """sum over L of weight * log p(target): a response's log-probability when its prompt tokens weigh 0."""
  return jnp.sum(token_logprobs(logits_xLV, targets_xL) * weights_xL, axis=-1)
