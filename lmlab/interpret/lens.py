"""Logit lens (each layer's residual stream read out through the final norm and the unembedding) and direct
logit attribution (the target logit split into embedding, per-head attention and per-layer MLP contributions).

DLA convention: the final norm is linear once its denominator is frozen, so it is frozen at the final residual
x: RMSNorm gives logit = sum_c (scale * c / rms(x)) . u (u the target's unembedding row), LayerNorm
sum_c (scale * (c - mean(c)) / std(x)) . u plus a `final_norm_bias` term; the components c (token embeddings,
each head's projected output, each attention output bias, each MLP output) sum to x exactly, so the contributions
sum to the model's target logit. Post-norm encoders (a norm inside every block) have no such split: refused.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lmlab.models import ModelConfig
from lmlab.models.layers import Dense, Norm


@functools.partial(jax.jit, static_argnums=0)
def unembed(config: ModelConfig, params: dict, hidden_LD):
  """Logits of residual-stream vectors: the model's final norm (pre-norm models) and LM head, float32."""
  x = hidden_LD
  if not config.post_norm:
    x = Norm(config).apply({'params': params['final_norm']}, x)
  if config.tie_embeddings:
    embed = nn.Embed(config.vocab_size, config.d_model, dtype=jnp.dtype(config.compute_dtype))
    logits = embed.apply({'params': params['embed']}, x, method=nn.Embed.attend)
  else:
    logits = Dense((config.vocab_size,), ('embed', 'vocab'), config).apply({'params': params['lm_head']}, x)
  return logits.astype(jnp.float32)


def lens_layers(config: ModelConfig) -> list[tuple[str, str]]:
  """(row label, site) read by the lens: the stream entering layer 0, then the stream leaving every layer."""
  return [('input', 'layers/0/residual_in')] + [(f'layer {i}', f'layers/{i}/residual_out')
                                                for i in range(config.num_layers)]


def logit_lens(config: ModelConfig, params: dict, captured: dict, position: int, target: int | None = None,
               top_k: int = 5, row: int = 0) -> list[dict]:
  """Per layer (see lens_layers): top-k tokens and probabilities, and the target's rank and log-probability.

  The last row reads the final residual through the model's own head, so it is the model's prediction.
  """
  return logit_lens_rows(config, params, captured, [row], [position], [target], top_k)[0]


def logit_lens_rows(config: ModelConfig, params: dict, captured: dict, rows, positions, targets=None,
                    top_k: int = 5) -> list[list[dict]]:
  """logit_lens of several batch rows (each at its own position, with its own target or None), one unembed call."""
  layers = lens_layers(config)
  targets = [None] * len(rows) if targets is None else targets
  at = (np.asarray(rows), np.asarray(positions))
  hidden_RXD = jnp.stack([jnp.asarray(captured[name])[at] for _, name in layers], axis=1)
  logits_RXV = np.asarray(unembed(config, params, hidden_RXD.reshape(-1, hidden_RXD.shape[-1]))).reshape(
      len(rows), len(layers), -1)
  out = []
  for logits_XV, target in zip(logits_RXV, targets):
    entries = []
    for (label, name), logits_V in zip(layers, logits_XV):
      logprobs_V = np.asarray(jax.nn.log_softmax(logits_V))
      top = np.argsort(-logits_V, kind='stable')[:top_k]
      entry = {'layer': label, 'site': name, 'top_ids': top.tolist(), 'top_probs': np.exp(logprobs_V[top]).tolist()}
      if target is not None:
        entry.update(target_rank=int(np.sum(logits_V > logits_V[target])), target_logprob=float(logprobs_V[target]))
      entries.append(entry)
    out.append(entries)
  return out


def _unembedding_row(config: ModelConfig, params: dict, target: int):
  if config.tie_embeddings:
    return jnp.asarray(params['embed']['embedding'][target], jnp.float32)
  return jnp.asarray(params['lm_head']['kernel'][:, target], jnp.float32)


def direct_logit_attribution(config: ModelConfig, params: dict, captured: dict, position: int, target: int,
                             row: int = 0) -> dict:
  """{'logit', 'total', 'embeddings', 'attention' [layers], 'heads' [layers, H], 'attention_bias' [layers],
  'mlp' [layers], 'final_norm_bias'}: contributions to the target logit at `position` (module docstring)."""
  return direct_logit_attribution_rows(config, params, captured, [row], [position], [target])[0]


def direct_logit_attribution_rows(config: ModelConfig, params: dict, captured: dict, rows, positions,
                                  targets) -> list[dict]:
  """direct_logit_attribution of several batch rows (each at its own position and target), one compiled call."""
  if config.post_norm:
    raise ValueError('direct logit attribution needs a pre-norm model; post-norm encoders normalise inside every '
                     'block, so the residual stream is not a sum of layer outputs')
  names = ['logits', 'layers/0/residual_in'] + [f'layers/{i}/{s}' for i in range(config.num_layers)
                                                for s in ('attention/heads', 'mlp/output', 'residual_out')]
  at = (np.asarray(rows), np.asarray(positions))
  parts = _dla_rows(config, params, {n: jnp.asarray(captured[n])[at] for n in names},
                    jnp.asarray(targets, jnp.int32))
  out = []
  for r in range(len(rows)):
    row = {k: np.asarray(v[r]) for k, v in parts.items()}
    total = float(row['embeddings'] + row['heads'].sum() + row['attention_bias'].sum() + row['mlp'].sum()
                  + row['final_norm_bias'])
    out.append({**{k: float(v) if v.ndim == 0 else v for k, v in row.items()}, 'total': total,
                'attention': row['heads'].sum(1) + row['attention_bias']})
  return out


@functools.partial(jax.jit, static_argnums=0)
def _dla_rows(config: ModelConfig, params: dict, at: dict, targets_R):
  return jax.vmap(functools.partial(_dla, config, params))(at, targets_R)


def _dla(config: ModelConfig, params: dict, at: dict, target):
  """The contributions from one position's sites (`at`: site name -> [...] without batch and length)."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  x_D = f32(at[f'layers/{config.num_layers - 1}/residual_out'])
  scale_D = f32(params['final_norm']['scale'])
  u_D = _unembedding_row(config, params, target)
  if config.norm == 'rms':
    inv = jax.lax.rsqrt(jnp.mean(x_D * x_D) + config.norm_eps)
    project = lambda c: jnp.sum(c * inv * scale_D * u_D, axis=-1)
    norm_bias = jnp.zeros(())
  else:
    inv = jax.lax.rsqrt(jnp.var(x_D) + config.norm_eps)
    project = lambda c: jnp.sum((c - jnp.mean(c, axis=-1, keepdims=True)) * inv * scale_D * u_D, axis=-1)
    norm_bias = jnp.sum(f32(params['final_norm']['bias']) * u_D)
  heads, biases, mlps = [], [], []
  for i in range(config.num_layers):
    group, block = divmod(i, config.layers_per_group)
    out = params['layers'][f'block_{block}']['attn']['out']
    heads.append(project(jnp.einsum('HK,HKD->HD', f32(at[f'layers/{i}/attention/heads']), f32(out['kernel'][group]))))
    biases.append(project(f32(out['bias'][group])) if 'bias' in out else jnp.zeros(()))
    mlps.append(project(f32(at[f'layers/{i}/mlp/output'])))
  return {'logit': at['logits'][target], 'embeddings': project(f32(at['layers/0/residual_in'])),
          'heads': jnp.stack(heads), 'attention_bias': jnp.stack(biases), 'mlp': jnp.stack(mlps),
          'final_norm_bias': norm_bias}
