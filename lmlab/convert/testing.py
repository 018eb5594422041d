"""Tiny random models of every convertible shape, for tests and for trying the converters quickly."""
import dataclasses

import numpy as np

from lmlab.convert.offline import offline_model  # pylint: disable=unused-import  (tests use it from here)
from lmlab.models import ModelConfig, MoeConfig

_DECODER = dict(vocab_size=96, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=96, max_len=64,
                compute_dtype='float32')
TINY = {
    'llama': ModelConfig(**_DECODER, tie_embeddings=False, rope_base=500.0),
    'qwen2': ModelConfig(**_DECODER, attention_bias=True),
    'mixtral': ModelConfig(**_DECODER, tie_embeddings=False,
                           moe=MoeConfig(num_experts=4, top_k=2, dispatch='reference')),
    'bert': ModelConfig(family='encoder', vocab_size=96, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4,
                        ffn_dim=96, max_len=32, norm='layer', norm_eps=1e-12, post_norm=True, position='learned',
                        mlp='gelu', attention_bias=True, out_bias=True, type_vocab_size=2, compute_dtype='float32'),
}


def random_params(config: ModelConfig, seed: int = 0) -> dict:
  """Random float32 numpy params of the model's shapes (from jax.eval_shape: nothing is compiled).

  Every tensor gets noise, norm scales and biases included, so a mapping that drops or swaps one shows.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from lmlab.models import Transformer  # pylint: disable=g-import-not-at-top
  tokens = np.zeros((1, 4), np.int32)
  shapes = nn.unbox(jax.eval_shape(Transformer(config).init, jax.random.key(seed), tokens))['params']
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    return 1.0 + 0.1 * noise if name.endswith("'scale']") else 0.1 * noise

  params = jax.tree_util.tree_map_with_path(fill, shapes)
  if config.family == 'encoder':
    params['pooler'] = {'kernel': (0.1 * rng.standard_normal((config.d_model,) * 2)).astype(np.float32),
                        'bias': (0.1 * rng.standard_normal(config.d_model)).astype(np.float32)}
  return params


def same_config(a: ModelConfig, b: ModelConfig) -> bool:
  """Equal as networks: ignores settings a checkpoint does not carry (dtypes, dispatch, loss weights)."""
  keep = lambda c: dataclasses.replace(c, compute_dtype='float32', param_dtype='float32', remat='none',
                                       attention='auto', dropout=0.0,
                                       moe=dataclasses.replace(c.moe, dispatch='reference', aux_loss_weight=0.0,
                                                               z_loss_weight=0.0, capacity_factor=1.0,
                                                               capacity_impl='einsum'))
  return keep(a) == keep(b)


def byte_level_tokenizer():
  """An HFTokenizer over the 256 byte-level symbols (no merges) plus <|endoftext|> (id 256) as eos."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  from lmlab.data.tokenizers import HFTokenizer  # pylint: disable=g-import-not-at-top
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(alphabet + ['<|endoftext|>'])}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken('<|endoftext|>', special=True)])
  return HFTokenizer(tok, eos_id=256, pad_id=256)
