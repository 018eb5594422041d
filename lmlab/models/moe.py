"""Mixture-of-Experts feed-forward: router, balance and z losses, three dispatch paths, expert parallelism.

Letters: B batch, L length, D d_model, F expert ffn width, E routed (computing) experts, N router slots
(E routed + zero-computation experts), K experts per token, T tokens, A token copies (T * K), G capacity
groups, C capacity per expert and group, P expert-parallel shards, M rows received from all shards (P * A),
X MoE layers.

Routing, losses and metrics run in the global SPMD program (so they see every token); only the expert
computation runs per device inside `jax.shard_map` when a mesh is active, with `all_to_all` over the
`expert` mesh axis moving tokens to the devices that hold their experts.

Conventions: capacity groups are the batch rows (C counts one sequence's tokens), so sharding the batch never
changes which tokens are dropped; `load` has one entry per router slot (N, zero-computation experts last);
jitter draws from the `dropout` stream, which the layer scan splits per layer.

Capacity dispatch has two implementations (`capacity_impl`), same drops and results: `einsum`, GShard's one-hot
dispatch and combine tensors [G, T, E, C] contracted with the tokens (the oracle; its five G*T*E*C*D matmuls of
forward + backward cost 10T / 18F of the experts' FLOPs, 40% at moe_8x2's T 2048, F 2816), and `gather`, which moves
each kept token copy to its (expert, slot) row and back by index with the same one-to-one row moves as dropless.

Dropless grouped matmul (MegaBlocks-style, dense ops only): rows sorted by expert are padded per expert to
blocks of b rows (at most ceil(A / b) + E blocks, each one expert's), and each SwiGLU matmul is one batched
einsum over blocks against per-block copies of the weights, W[expert of block]. `jax.lax.ragged_dot` is not
used: XLA's GPU lowering costs time and memory linear in E (H100, bf16, one layer of 16384 tokens, D 1024,
F 2816, top-2, forward + backward: ragged_dot 24 / 48 / 89 / 181 ms and 4.3 / 8.5 / 17 / 34 GiB of temporaries
at E = 8 / 16 / 32 / 64; blocks 17 / 18 / 21 / 23 ms and 5.1 / 5.2 / 5.5 / 5.6 GiB). The weight copies take
(A / b + E) * D * F per matmul (1.5 GiB in bf16 at E = 8 above); a custom VJP gathers them again in the backward
instead of keeping them (plain autodiff would save three per layer), and sums each expert's per-block weight
gradients (float32, sorted segment sum). Padding and unpadding are row gathers whose backward is the other.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lmlab import sharding
from lmlab.models.config import ModelConfig, MoeConfig
from lmlab.models.layers import constrain, dtype, partitioned, site
from lmlab.models.mlp import Mlp

ROUTERS = ('softmax', 'sigmoid_bias', 'switch')
DISPATCHES = ('capacity', 'dropless', 'reference')
CAPACITY_IMPLS = ('einsum', 'gather')


def num_selected(m: MoeConfig) -> int:
  """Experts per token: the Switch router always picks one."""
  return 1 if m.router == 'switch' else m.top_k


def check_router_trains(m: MoeConfig) -> None:
  """Refuses, before training, a router the loss cannot train: renormalised softmax top-1 weights every token's
  expert by exactly 1, so only the auxiliary losses would move the router (Switch keeps the top-1 probability)."""
  if m.num_experts and m.router == 'softmax' and m.renormalize and m.top_k == 1:
    raise ValueError('model.moe.top_k=1 with the renormalised softmax router weights every expert output by 1, so '
                     'the loss never trains the router; set model.moe.router=switch (the top-1 probability, as '
                     'Switch does) or model.moe.renormalize=False')


def route(logits_TN, bias_N, m: MoeConfig):
  """(choice_TK, weights_TK, probs_TN) from float32 router logits; bias only steers the choice."""
  K = num_selected(m)
  if m.router in ('softmax', 'switch'):
    probs_TN = jax.nn.softmax(logits_TN, axis=-1)
    weights_TK, choice_TK = jax.lax.top_k(probs_TN, K)
    if m.router == 'softmax' and m.renormalize:
      weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
  elif m.router == 'sigmoid_bias':
    # DeepSeek-V3: the (non-trainable) bias decides which experts, the un-biased scores how much.
    scores_TN = jax.nn.sigmoid(logits_TN)
    _, choice_TK = jax.lax.top_k(scores_TN + jax.lax.stop_gradient(bias_N)[None, :], K)
    weights_TK = jnp.take_along_axis(scores_TN, choice_TK, axis=-1)
    weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
    probs_TN = scores_TN / jnp.sum(scores_TN, axis=-1, keepdims=True)
  else:
    raise ValueError(f'model.moe.router={m.router!r} is not one of {", ".join(ROUTERS)}')
  return choice_TK, weights_TK, probs_TN


def router_metrics(logits_TN, probs_TN, choice_TK, real_T) -> dict:
  """Balance loss E*sum(f*P) (1.0 at uniform routing for any K), z-loss, load and entropy over real tokens."""
  N, K = logits_TN.shape[-1], choice_TK.shape[-1]
  real_T = real_T.astype(jnp.float32)
  n_real = jnp.maximum(jnp.sum(real_T), 1.0)
  counts_N = jnp.einsum('TKN,T->N', jax.nn.one_hot(choice_TK, N, dtype=jnp.float32), real_T)
  load_N = counts_N / (K * n_real)  # f_i: share of the K*T assignments; no gradient (counts)
  mean_prob_N = jnp.einsum('TN,T->N', probs_TN, real_T) / n_real  # P_i
  lse_T = jax.nn.logsumexp(logits_TN, axis=-1)
  entropy_T = -jnp.sum(probs_TN * jnp.log(jnp.maximum(probs_TN, jnp.finfo(jnp.float32).tiny)), axis=-1)
  return {'aux_loss': N * jnp.sum(load_N * mean_prob_N),
          'z_loss': jnp.sum(jnp.square(lse_T) * real_T) / n_real,
          'load': load_N,
          'router_entropy': jnp.sum(entropy_T * real_T) / n_real}


def capacity(m: MoeConfig, group_size: int) -> int:
  """C = ceil(capacity_factor * K * T / E) slots per expert and group, at most T (a token visits an expert once)."""
  c = math.ceil(m.capacity_factor * num_selected(m) * group_size / m.num_experts)
  return max(1, min(c, group_size))


def capacity_positions(choice_GTK, valid_GTK, num_experts: int, C: int):
  """(position_GTK, keep_GTK): slot of each assignment in its expert's buffer; first choices go first (GShard)."""
  G, T, K = choice_GTK.shape
  onehot_GTKE = jax.nn.one_hot(jnp.where(valid_GTK, choice_GTK, -1), num_experts, dtype=jnp.int32)
  onehot_GAE = onehot_GTKE.transpose(0, 2, 1, 3).reshape(G, K * T, num_experts)  # choice-major order
  position_GAE = jnp.cumsum(onehot_GAE, axis=1) - 1
  position_GTK = jnp.sum(position_GAE * onehot_GAE, axis=-1).reshape(G, K, T).transpose(0, 2, 1)
  return position_GTK, valid_GTK & (position_GTK < C)


# ---- Expert computation on one device's tokens. `experts` = (wi_gate_EDF, wi_up_EDF, wo_EFD) holds this
# device's experts (and its slice of F under tensor parallelism, hence the psum over `tp`); `ep` and `tp`
# name the expert- and tensor-parallel mesh axes, empty outside a mesh.

def _capacity_swiglu(x_GECD, experts, ep, tp):
  """Expert SwiGLU over the capacity buffers; under expert parallelism each expert's buffers visit its device."""
  wi_gate_EDF, wi_up_EDF, wo_EFD = experts
  if ep:  # send expert e's buffers to the device that holds e; receive every group's share of ours
    x_GECD = jax.lax.all_to_all(x_GECD, ep, 1, 0, tiled=True)
  h_GECF = jax.nn.silu(jnp.einsum('GECD,EDF->GECF', x_GECD, wi_gate_EDF)) * jnp.einsum(
      'GECD,EDF->GECF', x_GECD, wi_up_EDF)
  y_GECD = jnp.einsum('GECF,EFD->GECD', h_GECF, wo_EFD)
  if tp:
    y_GECD = jax.lax.psum(y_GECD, tp)
  if ep:
    y_GECD = jax.lax.all_to_all(y_GECD, ep, 0, 1, tiled=True)
  return y_GECD


def _einsum_capacity_experts(x_GTD, choice_GTK, keep_GTK, weights_GTK, position_GTK, experts, ep=(), tp=(), *, C):
  """GShard einsum dispatch -> expert SwiGLU -> einsum combine; dropped assignments get zero output (the oracle)."""
  E = experts[0].shape[0] * _axis_size(ep)
  cdt = x_GTD.dtype
  expert_GTKE = jax.nn.one_hot(choice_GTK, E, dtype=jnp.float32) * keep_GTK[..., None]
  slot_GTKC = jax.nn.one_hot(position_GTK, C, dtype=jnp.float32)
  dispatch_GTEC = jnp.einsum('GTKE,GTKC->GTEC', expert_GTKE, slot_GTKC).astype(cdt)
  combine_GTEC = jnp.einsum('GTKE,GTKC,GTK->GTEC', expert_GTKE, slot_GTKC, weights_GTK).astype(cdt)
  y_GECD = _capacity_swiglu(jnp.einsum('GTEC,GTD->GECD', dispatch_GTEC, x_GTD), experts, ep, tp)
  return jnp.einsum('GTEC,GECD->GTD', combine_GTEC, y_GECD)


def _gather_capacity_experts(x_GTD, choice_GTK, keep_GTK, weights_GTK, position_GTK, experts, ep=(), tp=(), *, C):
  """The einsum path's result by row moves: each kept token copy goes to its (group, expert, slot) row and its
  output comes back, so dispatch and combine cost G*E*C*D moves instead of two G*T*E*C*D matmuls."""
  G, T, D = x_GTD.shape
  K = choice_GTK.shape[-1]
  E = experts[0].shape[0] * _axis_size(ep)
  A, R = G * T * K, G * E * C  # token copies; buffer rows
  keep_A = keep_GTK.reshape(A)
  group_G11 = jnp.arange(G, dtype=jnp.int32)[:, None, None]
  slot_A = jnp.where(keep_A, ((group_G11 * E + choice_GTK) * C + position_GTK).reshape(A), 0)
  # Kept copies fill distinct slots (capacity_positions), so this scatter of indices never collides.
  target_A = jnp.where(keep_A, slot_A, R)  # R: out of bounds, dropped by the scatter
  source_R = jnp.zeros((R,), jnp.int32).at[target_A].set(jnp.arange(A, dtype=jnp.int32), mode='drop')
  filled_R = jnp.zeros((R,), bool).at[target_A].set(True, mode='drop')
  x_AD = jnp.repeat(x_GTD.reshape(G * T, D), K, axis=0)
  x_GECD = _move_rows(x_AD, source_R, filled_R, slot_A, keep_A).reshape(G, E, C, D)
  y_RD = _capacity_swiglu(x_GECD, experts, ep, tp).reshape(R, D)
  y_GTKD = _move_rows(y_RD, slot_A, keep_A, source_R, filled_R).reshape(G, T, K, D)
  return jnp.einsum('GTKD,GTK->GTD', y_GTKD.astype(jnp.float32), weights_GTK).astype(x_GTD.dtype)


@jax.custom_vjp
def _permute(x_AD, order_A, inverse_A):
  """x_AD[order_A] for a permutation; its backward gathers with the inverse instead of scatter-adding."""
  return x_AD[order_A]


def _permute_fwd(x_AD, order_A, inverse_A):
  return x_AD[order_A], inverse_A


def _permute_bwd(inverse_A, g_AD):
  return g_AD[inverse_A], None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def _sort_by_group(group_A):
  order_A = jnp.argsort(group_A, stable=True)
  return order_A, jnp.argsort(order_A)


def _block_size(num_rows: int, num_experts: int) -> int:
  """Rows per block: the next power of two >= the mean group size, at most 128 (tiny inputs stay tiny)."""
  return min(128, 1 << max(0, math.ceil(math.log2(max(1, num_rows / num_experts)))))


@jax.custom_vjp
def _move_rows(x_AD, index_R, valid_R, inverse_A, used_A):
  """where(valid_R, x_AD[index_R], 0) for a one-to-one row map; its backward gathers with the inverse map."""
  return jnp.where(valid_R[:, None], x_AD[index_R], 0)


def _move_rows_fwd(x_AD, index_R, valid_R, inverse_A, used_A):
  return _move_rows(x_AD, index_R, valid_R, inverse_A, used_A), (index_R, valid_R, inverse_A, used_A)


def _move_rows_bwd(res, g_RD):
  index_R, valid_R, inverse_A, used_A = res
  return _move_rows(g_RD, inverse_A, used_A, index_R, valid_R), None, None, None, None


_move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


@jax.custom_vjp
def _block_matmul(x_NbD, w_EDF, expert_N):
  """x_NbD[n] @ w_EDF[expert_N[n]] for every block n: one batched matmul over per-block copies of the weights."""
  return jnp.einsum('NbD,NDF->NbF', x_NbD, w_EDF[expert_N])


def _block_matmul_fwd(x_NbD, w_EDF, expert_N):
  return _block_matmul(x_NbD, w_EDF, expert_N), (x_NbD, w_EDF, expert_N)


def _block_matmul_bwd(res, g_NbF):
  # The gathered weights are not saved but gathered again; each expert's gradient sums its (sorted) blocks.
  x_NbD, w_EDF, expert_N = res
  dx_NbD = jnp.einsum('NbF,NDF->NbD', g_NbF, w_EDF[expert_N])
  dw_NDF = jnp.einsum('NbD,NbF->NDF', x_NbD, g_NbF, preferred_element_type=jnp.float32)
  dw_EDF = jax.ops.segment_sum(dw_NDF, expert_N, num_segments=w_EDF.shape[0], indices_are_sorted=True)
  return dx_NbD, dw_EDF.astype(w_EDF.dtype), None


_block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def _vary_alike(*xs):
  """Casts arrays to vary over the union of their manual mesh axes, as a custom VJP's inputs and outputs must."""
  varying_X = [jax.typeof(x).manual_axis_type.varying for x in xs]
  union = frozenset().union(*varying_X)
  return [jax.lax.pcast(x, tuple(sorted(union - v)), to='varying') for x, v in zip(xs, varying_X)]


def _grouped_swiglu(x_AD, group_sizes_E, experts, tp):
  """SwiGLU over rows sorted by expert, as blocks of one expert each; rows past sum(group_sizes) come out zero."""
  A, D = x_AD.shape
  E = group_sizes_E.shape[0]
  b = _block_size(A, E)
  num_blocks = -(-A // b) + E  # each group wastes less than one block
  blocks_E = (group_sizes_E + b - 1) // b
  block_end_E, row_end_E = jnp.cumsum(blocks_E), jnp.cumsum(group_sizes_E)
  block_start_E, row_start_E = block_end_E - blocks_E, row_end_E - group_sizes_E
  # Padded row r = n * b + j of block n is row j of expert_N[n]'s block n - block_start; E marks an unused block.
  expert_N = jnp.searchsorted(block_end_E, jnp.arange(num_blocks), side='right')
  e_R = jnp.minimum(jnp.repeat(expert_N, b), E - 1)
  position_R = jnp.arange(num_blocks * b) - block_start_E[e_R] * b  # place in its expert's group
  valid_R = (jnp.repeat(expert_N, b) < E) & (position_R < group_sizes_E[e_R])
  source_R = jnp.where(valid_R, row_start_E[e_R] + position_R, 0)
  row_A = jnp.arange(A)
  e_A = jnp.minimum(jnp.searchsorted(row_end_E, row_A, side='right'), E - 1)
  used_A = row_A < row_end_E[-1]
  dest_A = jnp.where(used_A, block_start_E[e_A] * b + row_A - row_start_E[e_A], 0)
  x_NbD = _move_rows(x_AD, source_R, valid_R, dest_A, used_A).reshape(num_blocks, b, D)
  expert_N = jnp.minimum(expert_N, E - 1)  # unused blocks hold zero rows: any expert will do
  x_NbD, wi_gate_EDF, wi_up_EDF, wo_EFD = _vary_alike(x_NbD, *experts)  # autodiff psums the cast's transpose
  h_NbF = jax.nn.silu(_block_matmul(x_NbD, wi_gate_EDF, expert_N)) * _block_matmul(x_NbD, wi_up_EDF, expert_N)
  y_RD = _block_matmul(h_NbF, wo_EFD, expert_N).reshape(num_blocks * b, D)
  y_AD = _move_rows(y_RD, dest_A, used_A, source_R, valid_R)
  return jax.lax.psum(y_AD, tp) if tp else y_AD


def _exchange_ragged(xs_AD, expert_sorted_A, counts_E, experts, ep, tp):
  """Expert-parallel grouped matmul: ship each shard's contiguous run of sorted rows with all_to_all.

  Shapes must be static, so every device sends a full A-row buffer to each of the P shards (worst case:
  all its tokens chose one shard); this is exact (dropless) at P times the activation memory.
  """
  A, D = xs_AD.shape
  E = counts_E.shape[0]
  n_shards = _axis_size(ep)
  El = E // n_shards
  counts_PE = counts_E.reshape(n_shards, El)
  send_P = jnp.sum(counts_PE, axis=1)
  start_P = jnp.cumsum(send_P) - send_P
  row_A = jnp.arange(A)
  source_PA = jnp.minimum(start_P[:, None] + row_A[None, :], A - 1)
  send_PAD = jnp.where((row_A[None, :] < send_P[:, None])[..., None], xs_AD[source_PA], 0)
  recv_PAD = jax.lax.all_to_all(send_PAD, ep, 0, 0, tiled=True)  # [source shard, row, D]
  recv_counts_PE = jax.lax.all_to_all(counts_PE, ep, 0, 0, tiled=True)  # source's rows per local expert
  # Rows from each source arrive sorted by local expert; regroup all sources' rows by local expert.
  ends_PE = jnp.cumsum(recv_counts_PE, axis=1)
  local_PA = jax.vmap(lambda ends_E: jnp.searchsorted(ends_E, row_A, side='right'))(ends_PE)  # El: unused row
  order_M, inverse_M = _sort_by_group(local_PA.reshape(-1))
  xr_MD = _permute(recv_PAD.reshape(-1, D), order_M, inverse_M)
  yr_MD = _grouped_swiglu(xr_MD, jnp.sum(recv_counts_PE, axis=0), experts, tp)
  y_PAD = _permute(yr_MD, inverse_M, order_M).reshape(n_shards, A, D)
  back_PAD = jax.lax.all_to_all(y_PAD, ep, 0, 0, tiled=True)  # [expert shard, row, D] on the source again
  shard_A = jnp.minimum(expert_sorted_A // El, n_shards - 1)
  offset_A = jnp.clip(row_A - start_P[shard_A], 0, A - 1)
  ys_AD = back_PAD.reshape(-1, D)[shard_A * A + offset_A]
  return jnp.where((expert_sorted_A < E)[:, None], ys_AD, 0)


def _dropless_experts(x_GTD, choice_GTK, valid_GTK, weights_GTK, experts, ep=(), tp=()):
  """Sort token copies by expert, block-grouped SwiGLU, unsort and combine; nothing is dropped."""
  G, T, D = x_GTD.shape
  K = choice_GTK.shape[-1]
  E = experts[0].shape[0] * _axis_size(ep)
  expert_A = jnp.where(valid_GTK, choice_GTK, E).reshape(-1)  # E: not computed (padding, zero expert)
  order_A, inverse_A = _sort_by_group(expert_A)
  xs_AD = _permute(jnp.repeat(x_GTD.reshape(G * T, D), K, axis=0), order_A, inverse_A)
  counts_E = jnp.bincount(expert_A, length=E).astype(jnp.int32)
  if ep:
    ys_AD = _exchange_ragged(xs_AD, expert_A[order_A], counts_E, experts, ep, tp)
  else:
    ys_AD = _grouped_swiglu(xs_AD, counts_E, experts, tp)
  y_GTKD = _permute(ys_AD, inverse_A, order_A).reshape(G, T, K, D)
  return jnp.einsum('GTKD,GTK->GTD', y_GTKD.astype(jnp.float32), weights_GTK).astype(x_GTD.dtype)


def _reference_experts(x_GTD, choice_GTK, valid_GTK, weights_GTK, experts):
  """Every expert on every token, weighted: slow and obviously right (the tests' ground truth); never sharded."""
  wi_gate_EDF, wi_up_EDF, wo_EFD = experts
  out_GTD = jnp.zeros(x_GTD.shape, jnp.float32)
  for e in range(wi_gate_EDF.shape[0]):
    h_GTF = jax.nn.silu(x_GTD @ wi_gate_EDF[e]) * (x_GTD @ wi_up_EDF[e])
    gate_GT = jnp.sum(jnp.where(valid_GTK & (choice_GTK == e), weights_GTK, 0.0), axis=-1)
    out_GTD += gate_GT[..., None] * (h_GTF @ wo_EFD[e]).astype(jnp.float32)
  return out_GTD.astype(x_GTD.dtype)


# ---- Mesh plumbing.

def _axis_size(axes) -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in axes) if axes else 1


def _mesh_axes(name: str, mesh) -> tuple:
  """Mesh axes that the active logical rules (default: lmlab.sharding's) give `name`, present in `mesh`."""
  rules = nn.get_logical_axis_rules() or sharding.DEFAULT_RULES
  for rule_name, axes in rules:
    if rule_name == name:
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      return tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
  return ()


def _sharded(fn, num_tokens_args: int, num_rows: int, num_experts: int):
  """Runs fn per device under the context mesh (tokens by batch, experts by `expert`); None without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None  # init and plain single-device calls
  batch, ep, tp = (_mesh_axes(n, mesh) for n in ('act_batch', 'expert', 'mlp'))
  n_batch = math.prod(mesh.shape[a] for a in batch)
  if ep and not set(ep) <= set(batch):
    raise ValueError(f'expert-parallel mesh axes {ep} must also split the batch (act_batch -> {batch})')
  if set(tp) & set(batch):
    raise ValueError(f'mlp mesh axes {tp} must not also split the batch (act_batch -> {batch})')
  if ep and num_experts % _axis_size(ep):
    raise ValueError(f'model.moe.num_experts={num_experts} is not divisible by the expert-parallel size '
                     f'{_axis_size(ep)} (mesh axes {ep})')
  if num_rows % n_batch:
    if ep:
      raise ValueError(f'batch of {num_rows} rows does not split over the {n_batch} data-parallel devices')
    return None
  tokens, experts_in, experts_out = P(batch or None), P(ep or None, None, tp or None), P(ep or None, tp or None)
  return jax.shard_map(lambda *a: fn(*a, ep=ep, tp=tp), out_specs=tokens,
                       in_specs=(tokens,) * num_tokens_args + ((experts_in, experts_in, experts_out),))


class MoeMlp(nn.Module):
  """Routed SwiGLU experts (+ shared and zero-computation experts); returns (y_BLD, metrics)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL):
    c, m = self.config, self.config.moe
    if m.dispatch not in DISPATCHES:
      raise ValueError(f'model.moe.dispatch={m.dispatch!r} is not one of {", ".join(DISPATCHES)}')
    if m.capacity_impl not in CAPACITY_IMPLS:
      raise ValueError(f'model.moe.capacity_impl={m.capacity_impl!r} is not one of {", ".join(CAPACITY_IMPLS)}')
    E, F, cdt = m.num_experts, m.expert_ffn_dim or c.ffn_dim, dtype(c.compute_dtype)
    real_BL = segment_ids_BL != 0  # padding is never routed, computed or counted
    choice_BLK, weights_BLK, metrics = self.route(x_BLD, real_BL)
    weights_BLK = site(self, 'expert_weights', weights_BLK)  # zero a weight to ablate that expert for that token
    valid_BLK = real_BL[..., None] & (choice_BLK < E)  # assignments that reach a computing expert
    x_BLD = x_BLD.astype(cdt)
    y_BLD, keep_BLK = self.routed_experts(x_BLD, choice_BLK, valid_BLK, weights_BLK, F)
    n_real = jnp.maximum(jnp.sum(real_BL), 1).astype(jnp.float32)
    metrics['dropped_fraction'] = jnp.sum(valid_BLK & ~keep_BLK) / (choice_BLK.shape[-1] * n_real)
    if m.zero_experts:  # LongCat-Flash: a zero-computation expert returns its input, scaled by its gate
      zero_gate_BL = jnp.sum(jnp.where(real_BL[..., None] & (choice_BLK >= E), weights_BLK, 0.0), axis=-1)
      y_BLD += (zero_gate_BL[..., None] * x_BLD.astype(jnp.float32)).astype(y_BLD.dtype)
    if m.shared_experts:
      # DeepSeekMoE shared experts: S always-on SwiGLU experts of width F are exactly one SwiGLU of width S*F.
      y_BLD += Mlp(c, F * m.shared_experts, name='shared')(x_BLD).astype(y_BLD.dtype)
    y_BLD = jnp.where(real_BL[..., None], y_BLD, 0).astype(cdt)
    metrics['loss'] = m.aux_loss_weight * metrics['aux_loss'] + m.z_loss_weight * metrics['z_loss']
    metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
    return constrain(y_BLD, ('act_batch', 'act_length', 'act_embed')), metrics

  def route(self, x_BLD, real_BL):
    """(choice_BLK, weights_BLK, router metrics); weights are zero on padding."""
    c, m = self.config, self.config.moe
    N, K = m.num_experts + m.zero_experts, num_selected(m)
    if not 1 <= K <= N:
      raise ValueError(f'model.moe.top_k={m.top_k} must be between 1 and the {N} router slots')
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
    router_DN = self.param('router', partitioned(init, ('embed', None)), (x_BLD.shape[-1], N), dtype(c.param_dtype))
    if m.router == 'sigmoid_bias':
      bias_N = self.variable('router_state', 'bias', jnp.zeros, (N,), jnp.float32).value
    else:
      bias_N = jnp.zeros((N,), jnp.float32)
    x_BLD = x_BLD.astype(jnp.float32)
    if m.jitter > 0 and self.has_rng('dropout'):  # Switch-style multiplicative noise, training only
      x_BLD *= jax.random.uniform(self.make_rng('dropout'), x_BLD.shape, jnp.float32, 1.0 - m.jitter, 1.0 + m.jitter)
    B, L, _ = x_BLD.shape
    logits_TN = jnp.einsum('BLD,DN->BLN', x_BLD, router_DN.astype(jnp.float32)).reshape(B * L, N)
    choice_TK, weights_TK, probs_TN = route(logits_TN, bias_N, m)
    if self.is_mutable_collection('intermediates'):  # lmlab.interpret's routing capture; not even a reshape otherwise
      self.sow('intermediates', 'router_probs', probs_TN.reshape(B, L, N))
      self.sow('intermediates', 'experts', choice_TK.reshape(B, L, K))
    metrics = router_metrics(logits_TN, probs_TN, choice_TK, real_BL.reshape(-1))
    weights_BLK = jnp.where(real_BL[..., None], weights_TK.reshape(B, L, K), 0.0)
    return choice_TK.reshape(B, L, K), weights_BLK, metrics

  def routed_experts(self, x_BLD, choice_BLK, valid_BLK, weights_BLK, F):
    """(y_BLD, keep_BLK): the chosen computing experts' weighted outputs, by the configured dispatch path."""
    c, m = self.config, self.config.moe
    B, L, D = x_BLD.shape
    E, pdt = m.num_experts, dtype(c.param_dtype)
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal', in_axis=1, out_axis=2, batch_axis=0)
    experts = (self.param('wi_gate', partitioned(init, ('expert', 'embed', 'mlp')), (E, D, F), pdt),
               self.param('wi_up', partitioned(init, ('expert', 'embed', 'mlp')), (E, D, F), pdt),
               self.param('wo', partitioned(init, ('expert', 'mlp', 'embed')), (E, F, D), pdt))
    experts = tuple(w.astype(x_BLD.dtype) for w in experts)
    args, keep_BLK = (x_BLD, choice_BLK, valid_BLK, weights_BLK), valid_BLK
    if m.dispatch == 'capacity':  # groups are the batch rows, so sharding the batch changes no drops
      C = capacity(m, L)
      position_BLK, keep_BLK = capacity_positions(choice_BLK, valid_BLK, E, C)
      impl = _einsum_capacity_experts if m.capacity_impl == 'einsum' else _gather_capacity_experts
      fn, args = functools.partial(impl, C=C), (x_BLD, choice_BLK, keep_BLK, weights_BLK, position_BLK)
    elif m.dispatch == 'dropless':
      fn = _dropless_experts
    else:
      return _reference_experts(*args, experts), keep_BLK
    # Init traces a batch of one, possibly under the training mesh: the local path gives the same shapes.
    sharded = None if self.is_initializing() else _sharded(fn, len(args), B, E)
    return (sharded or fn)(*args, experts), keep_BLK


def update_router_state(model_state: dict, aux: dict, moe_config: MoeConfig) -> dict:
  """Aux-loss-free balancing (DeepSeek-V3): b_i += rate * sign(mean_load - load_i), outside the gradient."""
  load_XN = jax.lax.stop_gradient(aux['load'])  # X: MoE layers, stacked by the scan like the biases
  step_XN = moe_config.bias_update_rate * jnp.sign(jnp.mean(load_XN, axis=-1, keepdims=True) - load_XN)

  def update(bias_XN):
    if bias_XN.shape != step_XN.shape:
      raise ValueError(f'router bias {bias_XN.shape} does not match the MoE load metric {step_XN.shape}')
    return bias_XN + step_XN.astype(bias_XN.dtype)

  return {**model_state, 'router_state': jax.tree.map(update, model_state['router_state'])}
