"""Small building blocks shared by every model family: norms, rotary embeddings, dtypes, initialisers, and the
named activation sites (`site`) that lmlab.interpret captures and patches."""
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmlab.models.config import ModelConfig

Axes = Sequence[str | None]


def dtype(name: str):
  return jnp.dtype(name)


def partitioned(init, names: Axes):
  """An initialiser whose parameter carries logical axis names (for the sharding rules)."""
  return nn.with_logical_partitioning(init, tuple(names))


def constrain(x, names: Axes):
  """Pins a large activation to its logical sharding (a no-op outside a mesh)."""
  return nn.with_logical_constraint(x, tuple(names))


class Dense(nn.Module):
  """x @ W (+ b) contracting the last `in_axes` axes of x into `features`; W carries logical `names`.

  Flax's DenseGeneral flattens the kernel during init, which breaks logically partitioned
  initialisers under a mesh; this keeps the kernel in its true shape and scales by fan-in.
  """
  features: tuple[int, ...]
  names: Axes
  config: ModelConfig
  in_axes: int = 1
  use_bias: bool = False
  init_scale: float = 1.0

  @nn.compact
  def __call__(self, x):
    c = self.config
    n_in, n_out = self.in_axes, len(self.features)
    init = nn.initializers.variance_scaling(self.init_scale, 'fan_in', 'truncated_normal',
                                            in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param('kernel', partitioned(init, self.names), x.shape[x.ndim - n_in:] + tuple(self.features),
                        dtype(c.param_dtype))
    y = jnp.tensordot(x.astype(dtype(c.compute_dtype)), kernel.astype(dtype(c.compute_dtype)), axes=n_in)
    if self.use_bias:
      bias = self.param('bias', partitioned(nn.initializers.zeros, self.names[n_in:]), tuple(self.features),
                        dtype(c.param_dtype))
      y = y + bias.astype(y.dtype).reshape((1,) * (y.ndim - n_out) + tuple(self.features))
    return y


def embed_init():
  return nn.initializers.normal(stddev=0.02)


class Norm(nn.Module):
  """RMSNorm (Llama) or LayerNorm (BERT) over the last axis, computed in float32."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BLD):
    c = self.config
    x = x_BLD.astype(jnp.float32)
    lead = (1,) * (x.ndim - 1)  # explicit broadcast: works with jax_numpy_rank_promotion='raise'
    scale = self.param('scale', partitioned(nn.initializers.ones, ('embed',)), (x.shape[-1],),
                       dtype(c.param_dtype)).reshape(lead + (-1,))
    if c.norm == 'rms':
      y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + c.norm_eps) * scale
    elif c.norm == 'layer':
      bias = self.param('bias', partitioned(nn.initializers.zeros, ('embed',)), (x.shape[-1],),
                        dtype(c.param_dtype)).reshape(lead + (-1,))
      mean = jnp.mean(x, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
      y = (x - mean) * jax.lax.rsqrt(var + c.norm_eps) * scale + bias
    else:
      raise ValueError(f'model.norm={c.norm!r} is not one of rms, layer')
    return y.astype(dtype(c.compute_dtype))


def rope_inv_freq(K: int, base: float, config: ModelConfig | None = None):
  """Rotary inverse frequencies inv_freq_k (K // 2, float32), rescaled by config.rope_* (None: plain RoPE)."""
  inv_freq_k = 1.0 / (base ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K))
  if config is None:
    return inv_freq_k
  c = config
  if c.rope_scaling == 'linear':
    inv_freq_k = inv_freq_k / c.rope_factor
  elif c.rope_scaling == 'llama3':
    # transformers' _compute_llama3_parameters: wavelengths longer than orig / low are stretched by the factor,
    # shorter than orig / high kept, and the band between blended linearly in orig / wavelength.
    orig, low, high, factor = c.rope_original_max_len, c.rope_low_freq_factor, c.rope_high_freq_factor, c.rope_factor
    wavelen_k = 2 * math.pi / inv_freq_k
    smooth_k = (orig / wavelen_k - low) / (high - low)
    blended_k = (1 - smooth_k) * inv_freq_k / factor + smooth_k * inv_freq_k
    inv_freq_k = jnp.where(wavelen_k > orig / low, inv_freq_k / factor,
                           jnp.where(wavelen_k < orig / high, inv_freq_k, blended_k))
  elif c.rope_scaling != 'none':
    raise ValueError(f'model.rope_scaling={c.rope_scaling!r} is not one of none, linear, llama3')
  if c.rope_freq_factors:  # llama.cpp divides each frequency by its rope_freqs.weight entry
    if len(c.rope_freq_factors) != K // 2:
      raise ValueError(f'model.rope_freq_factors has {len(c.rope_freq_factors)} values; head_dim {K} needs {K // 2}')
    inv_freq_k = inv_freq_k / jnp.asarray(c.rope_freq_factors, jnp.float32)
  return inv_freq_k


def rope(x_BLHK, positions_BL, base: float, config: ModelConfig | None = None):
  """Rotary embedding, Hugging Face half-split layout (rotate_half), angles in float32; frequencies: rope_inv_freq."""
  inv_freq_k = rope_inv_freq(x_BLHK.shape[-1], base, config)
  angles_BLk = positions_BL[..., None].astype(jnp.float32) * inv_freq_k[None, None, :]
  cos_BL1K = jnp.cos(jnp.concatenate([angles_BLk, angles_BLk], -1))[:, :, None, :]
  sin_BL1K = jnp.sin(jnp.concatenate([angles_BLk, angles_BLk], -1))[:, :, None, :]
  x = x_BLHK.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos_BL1K + rotated * sin_BL1K).astype(x_BLHK.dtype)


def site(module: nn.Module, name: str, x):
  """A named activation for lmlab.interpret: replaced where variables['patches'][...][name]['mask'] holds, then sown.

  Costs nothing unless asked for: the patch is traced only when the caller passes a `patches` entry for this
  site ({'mask': bool, 'value': like x}; jnp.where, so a patched value is exactly the value given), and `sow` is
  a no-op unless the `intermediates` collection is mutable (flax's init leaves it out too).
  """
  if module.has_variable('patches', name):
    patch = module.get_variable('patches', name)
    x = jnp.where(patch['mask'], patch['value'].astype(x.dtype), x)
  module.sow('intermediates', name, x)
  return x
