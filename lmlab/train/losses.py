"""Token losses as small pure functions; the train step adds whichever a config enables."""
import jax
import jax.numpy as jnp


def token_cross_entropy(logits_BLV, targets_BL, weights_BL):
  """Summed masked cross-entropy in float32 plus what eval needs: (nll_sum, logsumexp^2 sum, correct_sum)."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  nll_sum = jnp.sum((lse_BL - target_logit_BL) * weights_BL)
  z_sum = jnp.sum(jnp.square(lse_BL) * weights_BL)
  correct_sum = jnp.sum((jnp.argmax(logits_BLV, axis=-1) == targets_BL) * weights_BL)
  return nll_sum, z_sum, correct_sum


def moe_loss(aux) -> jax.Array:
  """Weighted MoE balance + router z-loss, averaged over the MoE layers (0 for dense models).

  The mean (as MaxText does) keeps the losses' weight independent of depth; a sum would grow with the layers.
  """
  return jnp.mean(aux['loss']) if 'loss' in aux else jnp.zeros((), jnp.float32)
