"""AdamW with warmup + cosine decay, global-norm clipping and a weight-decay mask."""
import jax
import optax


def learning_rate_schedule(config) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=max(config.steps, config.warmup_steps + 1), end_value=config.learning_rate * config.min_lr_ratio)


def decay_mask(params, decay_embeddings: bool = False):
  """True for matrices that get weight decay: never norms or biases, embeddings only when asked."""
  def wants_decay(path, _):
    names = [getattr(k, 'key', '') for k in path]
    if names[-1] in ('scale', 'bias'):
      return False
    return decay_embeddings or names[-1] != 'embedding'
  return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(config) -> optax.GradientTransformation:
  adamw = optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                      weight_decay=config.weight_decay,
                      mask=lambda params: decay_mask(params, config.decay_embeddings))
  if config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
  return adamw
