"""Hugging Face directories: config.json <-> ModelConfig, safetensors in and out, tokenizer files.

Weights are read with a small memory-mapped safetensors reader (numpy has no bfloat16, and the
`safetensors` numpy loader refuses it), so nothing here imports torch and nothing is unpickled.
"""
import json
import logging
import os
import struct

import numpy as np

from lmlab.convert import mapping
from lmlab.models import ModelConfig, MoeConfig

DECODERS = ('llama', 'mistral', 'qwen2', 'mixtral')
ENCODERS = ('bert',)
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl')
IGNORED = ('rotary_emb.inv_freq', 'position_ids')  # buffers some checkpoints carry; recomputed here


def refuse_pickle(path: str) -> None:
  raise ValueError(f'refusing to load {path}: PyTorch pickle files (.bin/.pt) can run code when opened; '
                   'convert them to safetensors first (transformers: model.save_pretrained(dir, '
                   'safe_serialization=True) in a sandbox you trust)')


# ---------------------------------------------------------------- config

ROPE_SCALING = {'linear': ('factor',), 'llama3': ('factor', 'low_freq_factor', 'high_freq_factor')}  # keys needed


def _rope(hf: dict) -> dict:
  """ModelConfig rope_* fields of a config.json, read the way transformers 5 does (rope_scaling wins over
  rope_parameters, whose rope_theta wins over the top-level one); scaling lmlab lacks is refused."""
  rope = hf.get('rope_scaling') or hf.get('rope_parameters') or {}
  out = {'rope_base': float(rope.get('rope_theta', hf.get('rope_theta', 10000.0)))}
  kind = rope.get('rope_type', rope.get('type')) or 'default'
  if kind == 'default':
    return out
  if kind not in ROPE_SCALING:
    raise ValueError(f'rope scaling {kind!r} in config.json is not supported; lmlab supports default, '
                     f'{", ".join(ROPE_SCALING)}')
  missing = [key for key in ROPE_SCALING[kind] if key not in rope]
  if missing:
    raise ValueError(f'rope scaling {kind!r} in config.json lacks {", ".join(missing)}, which transformers\' '
                     f'{kind} RoPE needs')
  out.update(rope_scaling=kind, rope_factor=float(rope['factor']))
  if kind == 'llama3':  # transformers takes a top-level original_max_position_embeddings first (Phi-3's place)
    original = (hf.get('original_max_position_embeddings') or rope.get('original_max_position_embeddings')
                or hf.get('max_position_embeddings', 2048))
    out.update(rope_low_freq_factor=float(rope['low_freq_factor']),
               rope_high_freq_factor=float(rope['high_freq_factor']), rope_original_max_len=int(original))
  return out


def _rope_to_hf(c: ModelConfig) -> dict:
  """rope_theta / rope_parameters (and the older rope_scaling) for config.json; errors on what HF cannot express."""
  if c.rope_freq_factors:
    raise ValueError('model.rope_freq_factors (per-frequency RoPE divisors from a GGUF rope_freqs.weight) have no '
                     'Hugging Face form: export to orbax, or replace them by the model\'s rope_scaling=llama3 settings')
  scaling = {}
  if c.rope_scaling in ROPE_SCALING:
    scaling = {'rope_type': c.rope_scaling, 'factor': c.rope_factor}
    if c.rope_scaling == 'llama3':
      scaling.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
                     original_max_position_embeddings=c.rope_original_max_len)
  elif c.rope_scaling != 'none':
    raise ValueError(f'model.rope_scaling={c.rope_scaling!r} is not one of none, linear, llama3')
  out = {'rope_theta': c.rope_base, 'rope_parameters': {'rope_type': 'default', **scaling, 'rope_theta': c.rope_base}}
  if scaling:  # transformers 4 reads rope_scaling (and the top-level rope_theta); 5 reads either
    out['rope_scaling'] = scaling
  return out


def config_from_hf(hf: dict) -> ModelConfig:
  """ModelConfig (float32 params) for a Hugging Face config.json dict."""
  kind = hf.get('model_type')
  if kind in ENCODERS:
    if hf.get('hidden_act', 'gelu') != 'gelu' or hf.get('position_embedding_type', 'absolute') != 'absolute':
      raise ValueError(f'BERT with hidden_act={hf.get("hidden_act")!r}, position_embedding_type='
                       f'{hf.get("position_embedding_type")!r} is not supported; lmlab has exact gelu, absolute positions')
    H = hf['num_attention_heads']
    return ModelConfig(
        family='encoder', vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], num_layers=hf['num_hidden_layers'],
        num_heads=H, num_kv_heads=H, ffn_dim=hf['intermediate_size'], max_len=hf['max_position_embeddings'],
        norm='layer', norm_eps=hf.get('layer_norm_eps', 1e-12), post_norm=True, position='learned', mlp='gelu',
        attention_bias=True, out_bias=True, tie_embeddings=hf.get('tie_word_embeddings', True),
        type_vocab_size=hf.get('type_vocab_size', 2), param_dtype='float32')
  if kind not in DECODERS:
    raise ValueError(f'unsupported model_type={kind!r} (architectures {hf.get("architectures")}); '
                     f'lmlab converts {", ".join(ENCODERS + DECODERS)}')
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f'{kind} with hidden_act={hf["hidden_act"]!r} is not supported; lmlab decoders use SwiGLU (silu)')
  if hf.get('sliding_window') and hf.get('use_sliding_window', kind == 'mistral'):
    logging.warning('config.json sets sliding_window=%s; lmlab attends the full context (same result for '
                    'sequences up to that length)', hf['sliding_window'])
  if kind == 'qwen2':
    attention_bias, out_bias = True, False
  else:
    attention_bias, mlp_bias = bool(hf.get('attention_bias', False)), bool(hf.get('mlp_bias', False))
    if attention_bias != mlp_bias:
      raise ValueError(f'{kind} with attention_bias={attention_bias}, mlp_bias={mlp_bias} is not supported; '
                       'lmlab has biases on attention and MLP outputs together (model.out_bias)')
    out_bias = attention_bias
  H, D = hf['num_attention_heads'], hf['hidden_size']
  head_dim = hf.get('head_dim') or D // H
  moe = MoeConfig()
  if kind == 'mixtral':
    moe = MoeConfig(num_experts=hf['num_local_experts'], top_k=hf['num_experts_per_tok'], router='softmax',
                    renormalize=True, every=1, aux_loss_weight=hf.get('router_aux_loss_coef', 0.01))
  return ModelConfig(
      family='decoder', vocab_size=hf['vocab_size'], d_model=D, num_layers=hf['num_hidden_layers'], num_heads=H,
      num_kv_heads=hf.get('num_key_value_heads') or H, head_dim=0 if head_dim * H == D else head_dim,
      ffn_dim=hf['intermediate_size'], max_len=hf.get('max_position_embeddings', 2048), norm='rms',
      norm_eps=hf.get('rms_norm_eps', 1e-6), position='rope', mlp='swiglu', **_rope(hf),
      attention_bias=attention_bias, out_bias=out_bias, tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      param_dtype='float32', moe=moe)


def config_to_hf(c: ModelConfig, tokenizer=None) -> dict:
  """config.json dict that transformers builds the same network from; errors on what HF cannot express."""
  if c.family == 'encoder':
    fits = (c.norm == 'layer' and c.post_norm and c.mlp == 'gelu' and c.position == 'learned' and c.attention_bias
            and c.out_bias and c.num_kv_heads == c.num_heads and c.dims_per_head * c.num_heads == c.d_model)
    if not fits:
      raise ValueError('only BERT-shaped encoders export to Hugging Face (layer norm, post_norm, gelu, learned '
                       'positions, all biases, num_kv_heads == num_heads, head_dim == d_model / num_heads)')
    hf = {'architectures': ['BertModel'], 'model_type': 'bert', 'hidden_act': 'gelu', 'hidden_size': c.d_model,
          'num_hidden_layers': c.num_layers, 'num_attention_heads': c.num_heads, 'intermediate_size': c.ffn_dim,
          'max_position_embeddings': c.max_len, 'type_vocab_size': c.type_vocab_size or 1,
          'layer_norm_eps': c.norm_eps, 'position_embedding_type': 'absolute', 'vocab_size': c.vocab_size,
          'hidden_dropout_prob': c.dropout, 'attention_probs_dropout_prob': c.dropout,
          'tie_word_embeddings': c.tie_embeddings}
  else:
    if not (c.norm == 'rms' and not c.post_norm and c.position == 'rope' and c.mlp == 'swiglu'):
      raise ValueError('only Llama-shaped decoders export to Hugging Face (rms norm, pre-norm, rope, swiglu)')
    if c.out_bias and not c.attention_bias:
      raise ValueError('model.out_bias without model.attention_bias has no Hugging Face architecture')
    hf = {'hidden_act': 'silu', 'hidden_size': c.d_model, 'intermediate_size': c.ffn_dim,
          'num_hidden_layers': c.num_layers, 'num_attention_heads': c.num_heads,
          'num_key_value_heads': c.num_kv_heads, 'head_dim': c.dims_per_head, 'max_position_embeddings': c.max_len,
          'rms_norm_eps': c.norm_eps, **_rope_to_hf(c), 'vocab_size': c.vocab_size,
          'tie_word_embeddings': c.tie_embeddings, 'attention_dropout': 0.0}
    if c.is_moe:
      m = c.moe
      if not (m.router == 'softmax' and m.renormalize and m.every == 1 and not m.shared_experts and not m.zero_experts
              and m.expert_ffn_dim in (0, c.ffn_dim) and not c.attention_bias):
        raise ValueError('only Mixtral-shaped MoE exports to Hugging Face (softmax top-k renormalised router, MoE in '
                         'every layer, no shared/zero experts, expert_ffn_dim == ffn_dim, no biases)')
      hf.update(architectures=['MixtralForCausalLM'], model_type='mixtral', num_local_experts=m.num_experts,
                num_experts_per_tok=m.top_k, router_aux_loss_coef=m.aux_loss_weight, sliding_window=None)
    elif c.attention_bias and not c.out_bias:
      hf.update(architectures=['Qwen2ForCausalLM'], model_type='qwen2', use_sliding_window=False)
    else:
      hf.update(architectures=['LlamaForCausalLM'], model_type='llama', attention_bias=c.attention_bias,
                mlp_bias=c.out_bias)
  hf.update(torch_dtype='float32', dtype='float32')
  if tokenizer is not None:
    for key in ('bos_id', 'eos_id', 'pad_id'):
      if getattr(tokenizer, key, None) is not None:
        hf[key.replace('_id', '_token_id')] = int(getattr(tokenizer, key))
  return hf


# ---------------------------------------------------------------- safetensors

_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'I64': np.int64, 'I32': np.int32,
           'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}


def _np_dtype(name: str):
  if name == 'BF16':
    import ml_dtypes  # pylint: disable=g-import-not-at-top  (ships with jax)
    return ml_dtypes.bfloat16
  if name not in _DTYPES:
    raise ValueError(f'safetensors dtype {name} is not supported; supported: BF16, {", ".join(_DTYPES)}')
  return _DTYPES[name]


class SafetensorsDir:
  """The tensors of every *.safetensors file in a directory (or the files its index names), memory-mapped."""

  def __init__(self, path: str):
    index = os.path.join(path, 'model.safetensors.index.json')
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
    else:
      files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
    if not files:
      found = sorted(os.listdir(path))
      if any(f.endswith(PICKLE_SUFFIXES) for f in found):
        refuse_pickle(os.path.join(path, next(f for f in found if f.endswith(PICKLE_SUFFIXES))))
      raise ValueError(f'no *.safetensors weights in {path} (found {found[:8]})')
    self.path = path
    self.tensors = {}
    for name in files:
      self.tensors.update(self._read_header(os.path.join(path, name)))
    self.used = set()

  @staticmethod
  def _read_header(file: str) -> dict:
    with open(file, 'rb') as f:
      (n,) = struct.unpack('<Q', f.read(8))
      header = json.loads(f.read(n))
    header.pop('__metadata__', None)
    return {k: (file, v['dtype'], tuple(v['shape']), 8 + n + v['data_offsets'][0], 8 + n + v['data_offsets'][1])
            for k, v in header.items()}

  def _resolve(self, name: str) -> str | None:
    candidates = [name, name.removeprefix('model.'), 'bert.' + name]
    if name.endswith('LayerNorm.weight'):
      candidates += [c.replace('LayerNorm.weight', 'LayerNorm.gamma') for c in candidates]
    if name.endswith('LayerNorm.bias'):
      candidates += [c.replace('LayerNorm.bias', 'LayerNorm.beta') for c in candidates]
    return next((c for c in candidates if c in self.tensors), None)

  def has(self, name: str) -> bool:
    return self._resolve(name) is not None

  def get(self, name: str) -> np.ndarray:
    key = self._resolve(name)
    if key is None:
      raise ValueError(f'tensor {name} is missing from {self.path} ({len(self.tensors)} tensors, e.g. '
                       f'{sorted(self.tensors)[:3]}); is config.json for these weights?')
    self.used.add(key)
    file, kind, shape, start, end = self.tensors[key]
    raw = np.memmap(file, dtype=np.uint8, mode='r', offset=start, shape=(end - start,)) if end > start else np.zeros(0, np.uint8)
    return np.asarray(raw.view(_np_dtype(kind)).reshape(shape), np.float32)

  def unused(self) -> list[str]:
    return sorted(k for k in set(self.tensors) - self.used if not k.endswith(IGNORED))


def save_safetensors(tensors: dict[str, np.ndarray], file: str) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, file, metadata={'format': 'pt'})


# ---------------------------------------------------------------- tokenizer

def _token(value):
  return value.get('content') if isinstance(value, dict) else value


def load_tokenizer(path: str, hf_config: dict | None = None):
  """HFTokenizer from tokenizer.json (+ tokenizer_config.json specials and chat template), or None."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from lmlab.data.tokenizers import HFTokenizer  # pylint: disable=g-import-not-at-top
  read = lambda name: json.load(open(os.path.join(path, name))) if os.path.exists(os.path.join(path, name)) else {}
  cfg = {**read('special_tokens_map.json'), **read('tokenizer_config.json')}
  file = os.path.join(path, 'tokenizer.json')
  if os.path.exists(file):
    tok = tokenizers.Tokenizer.from_file(file)
  elif os.path.exists(os.path.join(path, 'vocab.txt')):  # WordPiece (BERT) without tokenizer.json
    from tokenizers.implementations import BertWordPieceTokenizer  # pylint: disable=g-import-not-at-top
    tok = BertWordPieceTokenizer(os.path.join(path, 'vocab.txt'), lowercase=cfg.get('do_lower_case', True))._tokenizer
  else:
    logging.warning('no tokenizer.json in %s; the model loads without a tokenizer', path)
    return None
  tok.no_padding()  # a saved padding/truncation setting (MiniLM pads to 128) is a batching choice, not the model's
  tok.no_truncation()
  hf_config = hf_config or {}
  ids = {}
  for key in ('bos', 'eos', 'pad'):
    token = _token(cfg.get(f'{key}_token'))
    ids[key] = tok.token_to_id(token) if token else hf_config.get(f'{key}_token_id')
    if isinstance(ids[key], list):
      ids[key] = ids[key][0]
  template = cfg.get('chat_template')
  if template is None and os.path.exists(os.path.join(path, 'chat_template.jinja')):
    template = open(os.path.join(path, 'chat_template.jinja')).read()
  # The model's own setting: does encoding with specials put BOS first (config flag or post-processor)?
  adds_bos = ids['bos'] is not None and tok.encode('a', add_special_tokens=True).ids[:1] == [ids['bos']]
  add_bos = bool(cfg.get('add_bos_token', adds_bos))
  return HFTokenizer(tok, eos_id=ids['eos'], bos_id=ids['bos'], pad_id=ids['pad'], source=file,
                     chat_template=template, add_bos=add_bos and ids['bos'] is not None)


def save_tokenizer(tokenizer, path: str, config: ModelConfig) -> None:
  """tokenizer.json + tokenizer_config.json that transformers' AutoTokenizer reads."""
  inner = getattr(tokenizer, 'tokenizer', None)
  if inner is None or not hasattr(inner, 'save'):
    logging.warning('tokenizer %s has no tokenizer.json form; %s gets no tokenizer files',
                    getattr(tokenizer, 'name', type(tokenizer).__name__), path)
    return
  inner.save(os.path.join(path, 'tokenizer.json'))
  cfg = {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': config.max_len,
         'add_bos_token': bool(tokenizer.add_bos), 'add_eos_token': False, 'clean_up_tokenization_spaces': False}
  for key in ('bos', 'eos', 'pad'):
    token_id = getattr(tokenizer, f'{key}_id', None)
    if token_id is not None:
      cfg[f'{key}_token'] = inner.id_to_token(int(token_id))
  for key, token in (('unk', '[UNK]'), ('cls', '[CLS]'), ('sep', '[SEP]'), ('mask', '[MASK]'), ('pad', '[PAD]')):
    if config.family == 'encoder' and inner.token_to_id(token) is not None:
      cfg[f'{key}_token'] = token
  if tokenizer.chat_template:
    cfg['chat_template'] = tokenizer.chat_template
  with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
    json.dump(cfg, f, indent=2)


# ---------------------------------------------------------------- directories

def load_hf(path: str):
  """(ModelConfig, params, tokenizer) from a Hugging Face directory."""
  with open(os.path.join(path, 'config.json')) as f:
    hf = json.load(f)
  config = config_from_hf(hf)
  weights = SafetensorsDir(path)
  params = mapping.params_from_hf(config, weights.get, weights.has)
  unused = weights.unused()
  if unused:
    logging.warning('%d tensors in %s have no place in lmlab\'s %s and were left out, e.g. %s', len(unused), path,
                    hf.get('architectures', ['model'])[0], unused[:4])
  return config, params, load_tokenizer(path, hf)


def save_hf(path: str, config: ModelConfig, params, tokenizer=None) -> None:
  """A Hugging Face directory (config.json, model.safetensors, tokenizer files) for `params`."""
  os.makedirs(path, exist_ok=True)
  hf = config_to_hf(config, tokenizer)
  tensors = mapping.params_to_hf(config, params)
  if config.family == 'encoder' and not config.type_vocab_size:  # BertModel always adds a token-type row
    tensors['embeddings.token_type_embeddings.weight'] = np.zeros((1, config.d_model), np.float32)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)
  save_safetensors(tensors, os.path.join(path, 'model.safetensors'))
  if tokenizer is not None:
    save_tokenizer(tokenizer, path, config)
