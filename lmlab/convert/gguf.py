"""GGUF files of the llama family (llama, qwen2): metadata -> ModelConfig, tensors dequantised and renamed
to Hugging Face names (so mapping.py's tables apply), Q/K permutation undone, tokenizer rebuilt.

For `llama`, llama.cpp's converter permutes the rows of attn_q / attn_k so its RoPE can rotate adjacent
pairs (x0, x1), (x2, x3)...; lmlab (like Hugging Face) rotates the two halves of each head
(rotate_half). `unpermute` turns the GGUF rows back into the half-split layout. RoPE scaling is read as
llama.cpp applies it: a linear factor and Llama 3.x's per-frequency divisors (rope_freqs.weight). Files are
parsed by gguf_reader.py, so the `gguf` package is not needed at run time.
"""
import logging
import re

import numpy as np

from lmlab.convert import gguf_reader, mapping, quants
from lmlab.models import ModelConfig

ARCHITECTURES = ('llama', 'qwen2')
PERMUTED = ('llama',)  # llama.cpp permutes Q/K only for these (qwen2 runs NEOX-style RoPE, like HF)
# Hugging Face name (after `model.layers.{i}.`) -> GGUF name (after `blk.{i}.`)
LAYER_NAMES = {
    'input_layernorm.weight': 'attn_norm.weight', 'post_attention_layernorm.weight': 'ffn_norm.weight',
    'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k', 'self_attn.v_proj': 'attn_v',
    'self_attn.o_proj': 'attn_output', 'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up',
    'mlp.down_proj': 'ffn_down',
}
TOP_NAMES = {'model.embed_tokens.weight': 'token_embd.weight', 'model.norm.weight': 'output_norm.weight',
             'lm_head.weight': 'output.weight'}
# tokenizer.ggml.pre -> (split regex or None for GPT-2's, split digits one by one, ignore_merges)
_GPT2 = None
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    'default': (_GPT2, False, False), 'gpt2': (_GPT2, False, False),
    'smollm': (_GPT2, True, False), 'starcoder': (_GPT2, True, False), 'refact': (_GPT2, True, False),
    'llama-bpe': (_LLAMA3, False, True), 'llama3': (_LLAMA3, False, True), 'qwen2': (_QWEN2, False, False),
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp LLAMA_TOKEN_TYPE_*)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Hugging Face q/k rows -> llama.cpp rows (what convert_hf_to_gguf.py does); per head [2, K/2] -> [K/2, 2]."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp q/k rows -> Hugging Face half-split rows (the inverse of `permute`)."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
  """Metadata and tensors of one GGUF file; tensors come out dequantised under Hugging Face names."""

  def __init__(self, path: str):
    self.path = path
    self.meta, self.tensors, self.data = gguf_reader.read(path)
    self.arch = self.get_meta('general.architecture')
    if self.arch not in ARCHITECTURES:
      raise ValueError(f'GGUF architecture {self.arch!r} in {path} is not supported; lmlab reads '
                       f'{", ".join(ARCHITECTURES)}')
    bad = sorted({(t.kind, n) for n, t in self.tensors.items() if t.kind not in quants.SUPPORTED})
    if bad:
      raise ValueError(f'GGUF tensor {bad[0][1]} in {path} is {bad[0][0]} ({len(bad)} unsupported tensors); lmlab '
                       f'dequantises {", ".join(quants.SUPPORTED)}: requantise with llama-quantize')
    self.used = set()

  def get_meta(self, key: str, default=None):
    return self.meta.get(key, default)

  def config(self) -> ModelConfig:
    a = self.arch
    need = lambda key: self._need(f'{a}.{key}')
    D, H = need('embedding_length'), need('attention.head_count')
    head_dim = self.get_meta(f'{a}.attention.key_length') or self.get_meta(f'{a}.rope.dimension_count') or D // H
    if self.get_meta(f'{a}.expert_count'):
      raise ValueError(f'GGUF {self.path} is a mixture-of-experts model ({a}.expert_count='
                       f'{self.get_meta(f"{a}.expert_count")}); lmlab reads dense GGUF models only')
    vocab = self.get_meta(f'{a}.vocab_size') or self.tensors['token_embd.weight'].shape[0]
    return ModelConfig(
        family='decoder', vocab_size=int(vocab), d_model=int(D), num_layers=int(need('block_count')), num_heads=int(H),
        num_kv_heads=int(self.get_meta(f'{a}.attention.head_count_kv') or H),
        head_dim=0 if head_dim * H == D else int(head_dim), ffn_dim=int(need('feed_forward_length')),
        max_len=int(self.get_meta(f'{a}.context_length', 2048)), norm='rms',
        norm_eps=float(self.get_meta(f'{a}.attention.layer_norm_rms_epsilon', 1e-5)), position='rope',
        rope_base=float(self.get_meta(f'{a}.rope.freq_base', 10000.0)), mlp='swiglu',
        attention_bias='blk.0.attn_q.bias' in self.tensors, out_bias='blk.0.attn_output.bias' in self.tensors,
        tie_embeddings='output.weight' not in self.tensors, param_dtype='float32', **self._rope_scaling(head_dim))

  def _rope_scaling(self, head_dim: int) -> dict:
    """ModelConfig rope_* fields as llama.cpp reads them: a linear factor and per-frequency rope_freqs.weight."""
    a = self.arch
    scaling = self.get_meta(f'{a}.rope.scaling.type')
    if scaling not in (None, 'none', 'linear'):
      raise ValueError(f'GGUF {self.path} uses rope scaling {scaling!r}; lmlab supports none, linear and Llama 3.x '
                       'per-frequency factors (rope_freqs.weight)')
    # llama.cpp scales by this factor whatever the type says (0 or absent: none); rope.scale_linear is its old name.
    factor = float(self.get_meta(f'{a}.rope.scaling.factor') or self.get_meta(f'{a}.rope.scale_linear') or 1.0)
    out = {'rope_scaling': 'linear', 'rope_factor': factor} if factor != 1.0 else {}
    if 'rope_freqs.weight' in self.tensors:  # what convert_hf_to_gguf.py writes for rope_type llama3
      t = self.tensors['rope_freqs.weight']
      factors = quants.dequantize(gguf_reader.tensor_bytes(self.data, t), t.kind, t.shape).reshape(-1)
      if factors.size != head_dim // 2:
        raise ValueError(f'GGUF {self.path} has {factors.size} rope_freqs.weight factors; head_dim {head_dim} needs '
                         f'{head_dim // 2}')
      self.used.add('rope_freqs.weight')
      out['rope_freq_factors'] = tuple(float(f) for f in factors)
    return out

  def _need(self, key: str):
    value = self.get_meta(key)
    if value is None:
      raise ValueError(f'GGUF {self.path} has no metadata key {key}')
    return value

  @staticmethod
  def gguf_name(hf_name: str) -> str:
    """GGUF tensor name of a Hugging Face llama-layout name."""
    if hf_name in TOP_NAMES:
      return TOP_NAMES[hf_name]
    match = re.fullmatch(r'model\.layers\.(\d+)\.(.+?)(\.weight|\.bias)?', hf_name)
    if match:
      layer, rest, suffix = match.groups()
      if rest + (suffix or '') in LAYER_NAMES:
        return f'blk.{layer}.{LAYER_NAMES[rest + (suffix or "")]}'
      if rest in LAYER_NAMES:
        return f'blk.{layer}.{LAYER_NAMES[rest]}{suffix}'
    raise ValueError(f'no GGUF tensor name for {hf_name}')

  def has(self, hf_name: str) -> bool:
    return self.gguf_name(hf_name) in self.tensors

  def get(self, hf_name: str) -> np.ndarray:
    """Dequantised float32 tensor in Hugging Face layout ([out, in]); Q/K rows un-permuted."""
    name = self.gguf_name(hf_name)
    if name not in self.tensors:
      raise ValueError(f'GGUF {self.path} has no tensor {name} (for {hf_name}); found e.g. {sorted(self.tensors)[:4]}')
    self.used.add(name)
    t = self.tensors[name]
    w = quants.dequantize(gguf_reader.tensor_bytes(self.data, t), t.kind, t.shape)
    if self.arch not in PERMUTED:
      return w
    if '.attn_q.' in name:
      w = unpermute(w, self._need(f'{self.arch}.attention.head_count'))
    elif '.attn_k.' in name:
      a = self.arch
      w = unpermute(w, self.get_meta(f'{a}.attention.head_count_kv') or self._need(f'{a}.attention.head_count'))
    return w

  def tokenizer(self):
    """HFTokenizer rebuilt from tokenizer.ggml.* (gpt2-style byte-level BPE), or None without one."""
    from lmlab.data.tokenizers import HFTokenizer  # pylint: disable=g-import-not-at-top
    import tokenizers  # pylint: disable=g-import-not-at-top
    from tokenizers import decoders, models, pre_tokenizers, processors  # pylint: disable=g-import-not-at-top
    kind = self.get_meta('tokenizer.ggml.model')
    if kind is None:
      logging.warning('GGUF %s has no tokenizer; the model loads without one', self.path)
      return None
    if kind != 'gpt2':
      raise ValueError(f'GGUF tokenizer.ggml.model={kind!r} in {self.path} is not supported; lmlab rebuilds '
                       'gpt2 (byte-level BPE) tokenizers')
    tokens = list(self.get_meta('tokenizer.ggml.tokens'))
    types = list(self.get_meta('tokenizer.ggml.token_type', [1] * len(tokens)))
    merges = [tuple(m.split(' ', 1)) for m in self.get_meta('tokenizer.ggml.merges', [])]
    pre = self.get_meta('tokenizer.ggml.pre', 'default')
    if pre not in PRE_TOKENIZERS:
      logging.warning('GGUF tokenizer.ggml.pre=%r is not known to lmlab; splitting text like GPT-2', pre)
    split, digits, ignore_merges = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS['default'])
    tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                          ignore_merges=ignore_merges))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split:
      steps += [pre_tokenizers.Split(tokenizers.Regex(split), behavior='isolated'),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:
      steps += [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                            for t, kind_ in zip(tokens, types) if kind_ == CONTROL])
    tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                    for t, kind_ in zip(tokens, types) if kind_ == USER_DEFINED])
    bos, eos = self.get_meta('tokenizer.ggml.bos_token_id'), self.get_meta('tokenizer.ggml.eos_token_id')
    add_bos = bool(self.get_meta('tokenizer.ggml.add_bos_token', False)) and bos is not None
    if add_bos:  # so that the exported tokenizer.json adds it too
      tok.post_processor = processors.TemplateProcessing(single=f'{tokens[bos]} $A', pair=f'{tokens[bos]} $A $B',
                                                         special_tokens=[(tokens[bos], int(bos))])
    pad = self.get_meta('tokenizer.ggml.padding_token_id')
    as_int = lambda v: None if v is None else int(v)
    return HFTokenizer(tok, eos_id=as_int(eos), bos_id=as_int(bos), pad_id=as_int(pad), source=self.path,
                       chat_template=self.get_meta('tokenizer.chat_template'), add_bos=add_bos)


def load_gguf(path: str):
  """(ModelConfig, params, tokenizer) from a llama-family GGUF file."""
  f = GGUFFile(path)
  config = f.config()
  params = mapping.params_from_hf(config, f.get, f.has)
  unused = sorted(set(f.tensors) - f.used)
  if unused:
    logging.warning('%d GGUF tensors have no place in lmlab and were left out, e.g. %s', len(unused), unused[:4])
  return config, params, f.tokenizer()
