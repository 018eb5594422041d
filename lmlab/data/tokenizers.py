"""Tokenizers behind one small interface: encode/decode, vocab size, special ids, bytes per token.

`token_bytes` (UTF-8 bytes each id stands for) is what bits-per-byte is computed from, so every
tokenizer, whatever its vocabulary, reports comparable numbers.
"""
import numpy as np


class ByteTokenizer:
  """UTF-8 bytes shifted past three specials (T5/ByT5 layout): pad 0, eos 1, unk 2; no training."""
  name = 'bytes'
  pad_id, eos_id, unk_id, bos_id = 0, 1, 2, None
  offset = 3
  vocab_size = 256 + 3

  def encode(self, text: str) -> list[int]:
    return [b + self.offset for b in text.encode('utf-8')]

  def decode(self, ids) -> str:
    return bytes(int(i) - self.offset for i in ids if int(i) >= self.offset).decode('utf-8', errors='replace')

  def token_bytes(self) -> np.ndarray:
    lengths = np.ones(self.vocab_size, np.int32)
    lengths[:self.offset] = 0
    return lengths

  def to_dict(self) -> dict:
    return {'kind': 'bytes'}


class HFTokenizer:
  """A Hugging Face `tokenizers.Tokenizer` (tokenizer.json) with the special ids lmlab needs."""
  name = 'hf'

  def __init__(self, tokenizer, eos_id=None, bos_id=None, pad_id=None, source: str = '',
               chat_template: str | None = None, add_bos: bool = False):
    self.tokenizer = tokenizer
    self.eos_id, self.bos_id = eos_id, bos_id
    self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    self.source = source
    self.chat_template = chat_template
    self.add_bos = add_bos

  @classmethod
  def from_file(cls, path: str, **kwargs):
    import tokenizers  # pylint: disable=g-import-not-at-top
    return cls(tokenizers.Tokenizer.from_file(path), source=path, **kwargs)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def token_bytes(self) -> np.ndarray:
    lengths = np.zeros(self.vocab_size, np.int32)
    special = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
    for i in range(self.vocab_size):
      piece = self.tokenizer.id_to_token(i)
      if piece is not None and piece not in special:
        lengths[i] = len(self.tokenizer.decode([i]).encode('utf-8'))
    return lengths

  def to_dict(self) -> dict:
    return {'kind': 'hf', 'source': self.source, 'eos_id': self.eos_id, 'bos_id': self.bos_id,
            'pad_id': self.pad_id}


def check_vocab(model_vocab_size: int, tokenizer) -> None:
  """The embedding must have a row for every id the tokenizer can emit."""
  if model_vocab_size < tokenizer.vocab_size:
    raise ValueError(f'model.vocab_size={model_vocab_size} is smaller than the {tokenizer.name} tokenizer\'s '
                     f'vocabulary of {tokenizer.vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size} '
                     'or larger')


def tokenizer_from_config(data_config, workdir: str | None = None):
  """The tokenizer `data.tokenizer` names: 'bytes'."""
  del workdir  # Trained tokenizers will be looked up here.
  spec = data_config.tokenizer
  if spec == 'bytes':
    return ByteTokenizer()
  raise ValueError(f'unknown data.tokenizer {spec!r}; use bytes')
