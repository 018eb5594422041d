"""Model FLOPs per token and peak device throughput, for MFU.

FLOPs/token = 6 * active matmul params (LM head included, embedding lookup excluded; for MoE only the
top-k routed experts, shared experts and the router) + 6 * n_layers * seq_len * d_model (attention
scores and values, the same convention as shared/bench/peer_torch.py so MFU figures compare directly).
"""
from lmlab.models import ModelConfig

PEAK_TFLOPS = {  # dense bf16 spec sheet numbers, by substring of jax's device_kind
    'H200': 989.0, 'H100': 989.0, 'A100': 312.0, 'L4': 121.0, 'A10': 125.0,
    'TPU v5p': 459.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v4': 275.0, 'TPU v6': 918.0,
}


def active_matmul_params(c: ModelConfig) -> int:
  K = c.dims_per_head
  attention = c.d_model * K * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp_factor = 3 if c.mlp == 'swiglu' else 2
  dense_mlp = mlp_factor * c.d_model * c.ffn_dim
  per_group = c.layers_per_group * attention + (c.layers_per_group - (1 if c.is_moe else 0)) * dense_mlp
  if c.is_moe:
    expert_ffn = c.moe.expert_ffn_dim or c.ffn_dim
    routed = c.moe.top_k * mlp_factor * c.d_model * expert_ffn
    shared = c.moe.shared_experts * mlp_factor * c.d_model * expert_ffn
    router = c.d_model * (c.moe.num_experts + c.moe.zero_experts)
    per_group += routed + shared + router
  return (c.num_layers // c.layers_per_group) * per_group + c.vocab_size * c.d_model


def flops_per_token(c: ModelConfig, seq_len: int) -> float:
  return 6.0 * active_matmul_params(c) + 6.0 * c.num_layers * seq_len * c.d_model


def peak_tflops(device_kind: str) -> float | None:
  for name, tflops in PEAK_TFLOPS.items():
    if name.lower() in device_kind.lower():
      return tflops
  return None
