"""TrainState and its creation directly sharded: eval_shape for the layout, a jitted init for the values."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lmlab import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any   # non-trainable model collections (e.g. MoE router biases); {} for most models
  rng: jax.Array


def _init_fn(model, tx, seed: int, seq_len: int):
  def init():
    rng = jax.random.PRNGKey(seed)
    rng, init_rng = jax.random.split(rng)
    tokens_BL = jnp.zeros((1, seq_len), jnp.int32)
    variables = dict(model.init({'params': init_rng, 'dropout': init_rng}, tokens_BL))
    variables.pop('intermediates', None)
    params = variables.pop('params')
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(sharding.strip_boxes(params)),
                      model_state=variables, rng=rng)
  return init


def state_shardings(model, tx, seed: int, seq_len: int, mesh, rules):
  """NamedShardings for every leaf of the TrainState, from the parameters' logical names."""
  boxed = jax.eval_shape(_init_fn(model, tx, seed, seq_len))
  param_shardings = sharding.logical_shardings(boxed.params, mesh, rules)
  model_state_shardings = sharding.logical_shardings(boxed.model_state, mesh, rules)
  replicated = NamedSharding(mesh, P())
  opt_shardings = optax.tree_map_params(tx, lambda _, s: s, sharding.strip_boxes(boxed.opt_state), param_shardings,
                                        transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                    model_state=model_state_shardings, rng=replicated)


def create_train_state(model, tx, seed: int, seq_len: int, shardings) -> TrainState:
  """Parameters are born sharded: no full copy ever sits on one device."""
  init = _init_fn(model, tx, seed, seq_len)
  return jax.jit(lambda: sharding.strip_boxes(init()), out_shardings=shardings)()


def abstract_state(model, tx, seed: int, seq_len: int, shardings) -> TrainState:
  """ShapeDtypeStructs with target shardings: what a checkpoint restore fills in."""
  shapes = sharding.strip_boxes(jax.eval_shape(_init_fn(model, tx, seed, seq_len)))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
