"""Tokenizers behind one small interface: encode/decode, vocab size, special ids, bytes per token.

`token_bytes` (UTF-8 bytes each id stands for) is what bits-per-byte is computed from, so every
tokenizer, whatever its vocabulary, reports comparable numbers.

`data.tokenizer`: 'bytes'; 'hf:PATH' (a Hugging Face tokenizer.json); 'spm:PATH' (a SentencePiece
model); 'bpe:N' (a byte-level BPE of N ids trained on the train split, kept as WORKDIR/tokenizer.json).
"""
import os

import numpy as np

from lmlab.data import sources as sources_lib

# Special-token spellings of the common model families, most specific first.
EOS_TOKENS = ('<|endoftext|>', '<|end_of_text|>', '</s>', '<eos>', '<|eot_id|>')
BOS_TOKENS = ('<|begin_of_text|>', '<s>', '<bos>')
PAD_TOKENS = ('<|pad|>', '<pad>', '[PAD]')


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

  @classmethod
  def from_file_with_specials(cls, path: str):
    """from_file with eos/bos/pad ids found among the file's special tokens; an EOS is required."""
    if not os.path.isfile(path):
      raise ValueError(f'tokenizer file {path} does not exist; check data.tokenizer=hf:PATH')
    tokenizer = cls.from_file(path)
    special = {t.content: i for i, t in tokenizer.tokenizer.get_added_tokens_decoder().items() if t.special}
    find = lambda names: next((special[n] for n in names if n in special), None)
    if find(EOS_TOKENS) is None:
      raise ValueError(f'{path} has none of the EOS tokens {EOS_TOKENS} among its special tokens; '
                       'add one (documents are packed with EOS between them)')
    return cls(tokenizer.tokenizer, eos_id=find(EOS_TOKENS), bos_id=find(BOS_TOKENS), pad_id=find(PAD_TOKENS),
               source=path)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def token_bytes(self) -> np.ndarray:
    import tokenizers  # pylint: disable=g-import-not-at-top
    # Byte-level vocabularies spell one byte per character; decoding a lone id that holds part of a
    # multi-byte character would give U+FFFD (3 bytes) instead.
    byte_level = isinstance(self.tokenizer.decoder, tokenizers.decoders.ByteLevel)
    lengths = np.zeros(self.vocab_size, np.int32)
    special = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
    for i in range(self.vocab_size):
      piece = self.tokenizer.id_to_token(i)
      if piece is not None and piece not in special:
        lengths[i] = len(piece) if byte_level else len(self.tokenizer.decode([i]).encode('utf-8'))
    return lengths

  def to_dict(self) -> dict:
    return {'kind': 'hf', 'source': self.source, 'eos_id': self.eos_id, 'bos_id': self.bos_id,
            'pad_id': self.pad_id}


class SentencePieceTokenizer:
  """A SentencePiece model (.model); pad falls back to EOS when the model has none (padding is masked)."""
  name = 'spm'

  def __init__(self, path: str):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(path):
      raise ValueError(f'SentencePiece model {path} does not exist; check data.tokenizer=spm:PATH')
    self.source = path
    self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
    if self.sp.eos_id() < 0:
      raise ValueError(f'SentencePiece model {path} has no EOS id; train it with eos_id >= 0 '
                       '(documents are packed with EOS between them)')
    self.eos_id, self.unk_id = self.sp.eos_id(), self.sp.unk_id()
    self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
    self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])

  def token_bytes(self) -> np.ndarray:
    """Bytes per piece with '▁' as a space; the dummy-prefix space at a text's start counts too."""
    lengths = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self.sp.is_byte(i):
        lengths[i] = 1
      elif not (self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_unused(i)):
        lengths[i] = len(self.sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
    return lengths

  def to_dict(self) -> dict:
    return {'kind': 'spm', 'source': self.source, 'eos_id': self.eos_id, 'bos_id': self.bos_id,
            'pad_id': self.pad_id}


def train_bpe(data_config, vocab_size: int, out_dir: str, max_bytes: int = 64 << 20) -> str:
  """Trains a byte-level BPE on the train split (up to max_bytes of text); returns out_dir/tokenizer.json."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  specials = ['<|pad|>', '<|endoftext|>']
  if vocab_size < 256 + len(specials):
    raise ValueError(f'BPE vocab_size={vocab_size} cannot hold the 256 bytes and {len(specials)} special tokens; '
                     f'use at least {256 + len(specials)}')
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(_training_text(data_config, max_bytes), trainer)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, 'tokenizer.json')
  tokenizer.save(path + '.tmp')
  os.replace(path + '.tmp', path)  # Atomic, so concurrent hosts training the same file never see half of it.
  return path


def _training_text(data_config, max_bytes: int):
  """Train-split documents in source order, each source of a mixture contributing its weight's share."""
  pairs = sources_lib.parse_mixture(data_config)
  total = sum(w for _, w in pairs)
  for spec, weight in pairs:
    source, budget = sources_lib.make_source(spec, data_config, data_config.train_split), max_bytes * weight / total
    for i in range(len(source)):
      text = source[i]
      budget -= len(text)
      yield text
      if budget <= 0:
        break


def tokenizer_from_config(data_config, workdir: str | None = None):
  """The tokenizer `data.tokenizer` names; 'bpe:N' is trained into (or reloaded from) workdir."""
  spec = data_config.tokenizer
  kind, _, arg = spec.partition(':')
  if spec == 'bytes':
    return ByteTokenizer()
  if kind == 'hf' and arg:
    return HFTokenizer.from_file_with_specials(arg)
  if kind == 'spm' and arg:
    return SentencePieceTokenizer(arg)
  if kind == 'bpe' and arg.isdigit():
    if workdir is None:
      raise ValueError(f'data.tokenizer={spec} trains into the run\'s workdir, and none was given; pass workdir '
                       'or train one with experiments/tokenizer.py and use hf:PATH')
    path = os.path.join(workdir, 'tokenizer.json')
    if not os.path.isfile(path):
      train_bpe(data_config, int(arg), workdir)
    tokenizer = HFTokenizer.from_file_with_specials(path)
    if tokenizer.vocab_size != int(arg):
      raise ValueError(f'{path} has {tokenizer.vocab_size} ids, not the {arg} of data.tokenizer={spec} (trained '
                       f'for another config, or on too little text); use data.tokenizer=bpe:{tokenizer.vocab_size} '
                       'or another workdir')
    return tokenizer
  raise ValueError(f'unknown data.tokenizer {spec!r}; use bytes, hf:PATH, spm:PATH or bpe:VOCAB_SIZE')


def check_vocab(model_vocab_size: int, tokenizer) -> None:
  """The embedding must have a row for every id the tokenizer can emit."""
  if model_vocab_size < tokenizer.vocab_size:
    raise ValueError(f'model.vocab_size={model_vocab_size} is smaller than the {tokenizer.name} tokenizer\'s '
                     f'vocabulary of {tokenizer.vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size} '
                     'or larger')

