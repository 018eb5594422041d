"""Model hyper-parameters as frozen dataclasses, built once from the experiment ConfigDict.

Shape legend used across lmlab (nanodo style): B batch, L length, S key length, D d_model,
H query heads, G kv heads, K head dim, F ffn width, V vocab, E experts, C capacity, T tokens.
"""
import dataclasses
from typing import Any, Mapping


# Activations named with jax.ad_checkpoint.checkpoint_name inside each block, for the remat policies:
#   query_proj, key_proj, value_proj  q [B, L, H, K] and k, v [B, L, G, K] after RoPE, as attention reads them
#   attention_context                 attention's per-head output [B, L, H, K], the input of its output projection
#   attention_out                     the output projection [B, L, D], what the residual stream adds
#   mlp_in                            the feed-forward's input projections [B, L, F] (SwiGLU: gate and up)
#   mlp_hidden                        after the activation [B, L, F], the input of the down projection
#   mlp_out                           the down projection [B, L, D]
# (MoE blocks: only their shared experts, an Mlp, carry the mlp_* names; the routed experts name nothing yet.)
REMAT_SAVE_SETS = {
    'qkv_proj': ('query_proj', 'key_proj', 'value_proj'),
    'attention_out': ('attention_context', 'attention_out'),
    'attention': ('query_proj', 'key_proj', 'value_proj', 'attention_context', 'attention_out'),
    'mlp': ('mlp_in', 'mlp_hidden', 'mlp_out'),
}


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Mixture-of-Experts switches; num_experts == 0 means a dense model."""
  num_experts: int = 0
  top_k: int = 2
  router: str = 'softmax'          # softmax | sigmoid_bias | switch
  renormalize: bool = True         # softmax router: renormalise the top-k weights
  dispatch: str = 'dropless'       # capacity | dropless | reference
  capacity_factor: float = 1.25
  capacity_impl: str = 'einsum'    # capacity dispatch: einsum (GShard one-hot matmuls) | gather (row moves, same result)
  expert_ffn_dim: int = 0          # 0: same as the dense ffn_dim
  every: int = 1                   # MoE in every n-th layer (the last of each group of n)
  shared_experts: int = 0
  zero_experts: int = 0
  aux_loss_weight: float = 0.01
  z_loss_weight: float = 1e-3
  jitter: float = 0.0
  bias_update_rate: float = 1e-3   # sigmoid_bias router: aux-loss-free bias step


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """One config for both families: Llama-style decoders and BERT-style encoders."""
  family: str = 'decoder'          # decoder (causal) | encoder (bidirectional)
  vocab_size: int = 384
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0                # 0: d_model // num_heads
  ffn_dim: int = 512
  max_len: int = 2048              # learned positions only
  norm: str = 'rms'                # rms | layer
  norm_eps: float = 1e-5
  post_norm: bool = False          # BERT: normalise after the residual add
  position: str = 'rope'           # rope | learned
  rope_base: float = 10000.0
  rope_scaling: str = 'none'       # none | linear (every frequency / rope_factor) | llama3 (Llama 3.1, by wavelength)
  rope_factor: float = 1.0         # linear, llama3: the context extension factor
  rope_low_freq_factor: float = 1.0   # llama3: wavelengths over rope_original_max_len / this: frequency / rope_factor
  rope_high_freq_factor: float = 4.0  # llama3: wavelengths under rope_original_max_len / this: kept; between: blended
  rope_original_max_len: int = 8192   # llama3: the pretraining context length
  rope_freq_factors: tuple[float, ...] = ()  # per-frequency divisors, head_dim // 2 of them (GGUF rope_freqs.weight,
                                             # llama.cpp's form of Llama 3.x scaling); () for none
  mlp: str = 'swiglu'              # swiglu | gelu
  attention_bias: bool = False     # biases on q/k/v (BERT, Qwen2)
  out_bias: bool = False           # biases on attention output and MLP (BERT)
  tie_embeddings: bool = True
  type_vocab_size: int = 0         # BERT token types; 0: none
  dropout: float = 0.0
  param_dtype: str = 'float32'
  compute_dtype: str = 'bfloat16'
  remat: str = 'none'              # none | full | dots_saveable | dots_with_no_batch_dims_saveable | nothing_saveable
                                   # | save_NAMES (keep those activations, recompute the rest) | offload_NAMES (move
                                   # them to host memory instead; GPU/TPU), NAMES a key of REMAT_SAVE_SETS above
  loss_vocab_chunk: int = 0        # > 0: the training and eval loss take the logits this many vocabulary entries at
                                   # a time from the final hidden states, never forming [B, L, V] (0: whole logits)
  attention: str = 'auto'          # auto (jax.nn.dot_product_attention) | cudnn | xla | einsum
  moe: MoeConfig = MoeConfig()

  @property
  def dims_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def is_moe(self) -> bool:
    return self.moe.num_experts > 0

  @property
  def layers_per_group(self) -> int:
    """Layers in one scanned group: a MoE model scans groups of `moe.every` blocks."""
    return self.moe.every if self.is_moe else 1

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'model.num_heads={self.num_heads} must be a multiple of '
                       f'model.num_kv_heads={self.num_kv_heads}')
    if not self.head_dim and self.d_model % self.num_heads:
      raise ValueError(f'model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; '
                       'set model.head_dim')
    if self.loss_vocab_chunk < 0:
      raise ValueError(f'model.loss_vocab_chunk={self.loss_vocab_chunk} must be >= 0 (0: whole logits)')
    if self.num_layers % self.layers_per_group:
      raise ValueError(f'model.num_layers={self.num_layers} must be a multiple of model.moe.every={self.moe.every}')


def _build(cls, values: Mapping[str, Any]):
  names = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(names))
  if unknown:
    raise ValueError(f'unknown {cls.__name__} keys {unknown}; known: {sorted(names)}')
  return cls(**values)


def model_config_from_dict(values: Mapping[str, Any]) -> ModelConfig:
  """Builds a ModelConfig from a (ConfigDict-derived) mapping with a nested `moe` mapping."""
  values = dict(values)
  if values.get('rope_freq_factors') is not None:  # JSON gives a list; the config must stay hashable
    values['rope_freq_factors'] = tuple(values['rope_freq_factors'])
  moe = _build(MoeConfig, dict(values.pop('moe', {}) or {}))
  return _build(ModelConfig, {**values, 'moe': moe})


def model_config_to_dict(config: ModelConfig) -> dict:
  return dataclasses.asdict(config)
