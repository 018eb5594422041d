"""Model FLOPs per token and peak device throughput, for MFU.

FLOPs/token = 6 * active matmul params (LM head included, embedding lookup excluded) + 6 * n_layers * seq_len *
d_model (attention scores and values, the same convention as shared/bench/peer_torch.py so MFU figures compare
directly). For MoE, active means what a token actually runs: the router, the shared experts, and its K routed picks
(Switch: 1) that land on computing experts; a pick of a zero-computation expert costs no matmul. Which share of the
picks that is depends on the router: pass the measured one (the `moe/load` metric), else routing is taken as uniform
over the N = E + Z router slots, so the share is E / N (exact when there are no zero experts).
"""
from lmlab.models import ModelConfig
from lmlab.models.moe import num_selected

PEAK_TFLOPS = {  # dense bf16 spec sheet numbers, by substring of jax's device_kind
    'H200': 989.0, 'H100': 989.0, 'A100': 312.0, 'L4': 121.0, 'A10': 125.0,
    'TPU v5p': 459.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v4': 275.0, 'TPU v6': 918.0,
}
SWIGLU_MATRICES = 3  # routed experts are always SwiGLU (gate, up, down)


def computing_share(c: ModelConfig, load_XN=None) -> float:
  """Share of the routed picks that reach a computing expert: measured from per-layer load [X, N], else E / N."""
  m = c.moe
  if load_XN is None:
    return m.num_experts / (m.num_experts + m.zero_experts)
  rows = [[float(v) for v in row] for row in load_XN]  # Python floats: JSON has no numpy float32
  return sum(sum(row[:m.num_experts]) for row in rows) / len(rows)


def active_matmul_params(c: ModelConfig, share: float | None = None) -> float:
  """Matmul parameters one token runs through; `share` as computing_share (default: uniform routing)."""
  K = c.dims_per_head
  attention = c.d_model * K * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp_matrices = 3 if c.mlp == 'swiglu' else 2
  dense_mlp = mlp_matrices * c.d_model * c.ffn_dim
  per_group = c.layers_per_group * attention + (c.layers_per_group - (1 if c.is_moe else 0)) * dense_mlp
  if c.is_moe:
    m = c.moe
    expert_ffn = m.expert_ffn_dim or c.ffn_dim
    share = computing_share(c) if share is None else share
    routed = num_selected(m) * share * SWIGLU_MATRICES * c.d_model * expert_ffn
    shared = m.shared_experts * mlp_matrices * c.d_model * expert_ffn
    router = c.d_model * (m.num_experts + m.zero_experts)
    per_group += routed + shared + router
  return (c.num_layers // c.layers_per_group) * per_group + c.vocab_size * c.d_model


def flops_per_token(c: ModelConfig, seq_len: int, share: float | None = None) -> float:
  return 6.0 * active_matmul_params(c, share) + 6.0 * c.num_layers * seq_len * c.d_model


def peak_tflops(device_kind: str) -> float | None:
  for name, tflops in PEAK_TFLOPS.items():
    if name.lower() in device_kind.lower():
      return tflops
  return None
