"""Tokenizers behind one small interface: encode/decode, vocab size, special ids, UTF-8 bytes per token.

Bits per byte, the number that compares models across tokenizers, is the nats of the predicted text tokens over
ln 2 x the UTF-8 bytes those tokens decode to. Special tokens (EOS, BOS, pad) are not text: they have no bytes and
their nats stay out of the numerator (the loss per token still counts them). The bytes of a text are those of its
decoded form, `decode(encode(text))`: `len(text.encode())` for a text that round-trips (SentencePiece
normalisation, for one, may change a text). Every tokenizer gives them two ways:
- `token_bytes()`, per id: the bytes it adds inside a decoded text, after the text's first token (`▁` is a space,
  a `<0xNN>` byte-fallback piece one byte). The eval step sums this table on device: in packed batches a
  document's first token is never a target.
- `byte_counts(ids)`, per token of one encoded text: the table, corrected at the text's ends for what decoding
  does there (SentencePiece-style decoders drop the prefix space of the first token), so that
  `byte_counts(encode(text)).sum() == len(decode(encode(text)).encode())`.
A tokenizer.json whose decoder lmlab cannot count exactly (WordPiece, BPE suffixes, CTC, none) has no table
(`token_bytes()` is None, and the eval step refuses it) and `byte_counts` raises, so bits per byte is an error
rather than a wrong number, while the BERT-style encoders that have such decoders, and never report it, still load.

`data.tokenizer`: 'bytes'; 'hf:PATH' (a Hugging Face tokenizer.json); 'spm:PATH' (a SentencePiece
model); 'bpe:N' (a byte-level BPE of N ids trained on the train split, kept as WORKDIR/tokenizer.json).
"""
import functools
import json
import os
import re

import numpy as np

from lmlab.data import sources as sources_lib

# Special-token spellings of the common model families, most specific first.
EOS_TOKENS = ('<|endoftext|>', '<|end_of_text|>', '</s>', '<eos>', '<|eot_id|>')
BOS_TOKENS = ('<|begin_of_text|>', '<s>', '<bos>')
PAD_TOKENS = ('<|pad|>', '<pad>', '[PAD]')
# tokenizer.json decoder steps that decode each piece on its own except at a text's two ends.
PIECE_DECODERS = ('Metaspace', 'Replace', 'ByteFallback', 'Fuse', 'Strip')
BYTE_PIECE = re.compile(r'<0x[0-9A-Fa-f]{2}>')  # a byte-fallback piece, as the ByteFallback decoder reads it
_MARK = 'a'  # A piece every supported decoder leaves as it is: one on each side keeps a piece off a text's ends.


class TableBytes:
  """Bytes per token that do not depend on where a token stands in a text (bytes, byte-level BPE)."""

  def __init__(self, table_V: np.ndarray):
    self.table_V = table_V

  def counts(self, ids) -> np.ndarray:
    """Bytes per token of one encoded text."""
    return self.table_V[np.asarray(ids, np.int64)].astype(np.int64)


class PieceBytes(TableBytes):
  """Bytes per token under a decoder that decodes each piece alone except at a text's two ends.

  `pieces_V` holds each id's piece (None for specials, which decoding skips), `decode` maps a list of pieces to
  text. A piece's table entry is what it adds between two marks; at each end of a text, the fewest pieces that
  decode to some text there (a leading space stripped, a byte-fallback run whole) are measured as decoded.
  """

  def __init__(self, pieces_V: list, is_byte_V: list, decode):
    self.pieces_V, self.is_byte_V, self.decode = pieces_V, is_byte_V, decode
    super().__init__(np.array([0 if p is None else 1 if b else self.size([_MARK, p, _MARK]) - 2 * len(_MARK)
                               for p, b in zip(pieces_V, is_byte_V)], np.int32))

  def size(self, pieces) -> int:
    return len(self.decode(pieces).encode('utf-8'))

  def counts(self, ids) -> np.ndarray:
    counts = super().counts(ids)
    text = [k for k, i in enumerate(ids) if self.pieces_V[i] is not None]
    pieces, is_byte = [self.pieces_V[ids[k]] for k in text], [self.is_byte_V[ids[k]] for k in text]
    head, head_bytes = _edge(pieces, is_byte, lambda ps: self.size(ps + [_MARK]) - len(_MARK))
    tail, tail_bytes = _edge(pieces[::-1], is_byte[::-1], lambda ps: self.size([_MARK] + ps[::-1]) - len(_MARK))
    if head + tail > len(text):  # the two ends overlap: the whole text is one end
      head, head_bytes, tail = len(text), self.size(pieces), 0
    if head:
      counts[text[0]] += head_bytes - counts[text[:head]].sum()
    if tail:
      counts[text[-1]] += tail_bytes - counts[text[-tail:]].sum()
    return counts


def _edge(pieces: list, is_byte: list, size) -> tuple[int, int]:
  """(n, bytes) of the fewest leading `pieces` that `size` finds any text in (a byte run kept whole, so it decodes
  to whole characters): decoders strip a text's start only until they meet text."""
  n, found = 0, 0
  while n < len(pieces) and not found:
    n += 1
    while n < len(pieces) and is_byte[n - 1] and is_byte[n]:
      n += 1
    found = size(pieces[:n])
  return n, found


def _decoder_steps(spec: dict | None) -> list[str]:
  """The step types of a tokenizer.json decoder, nested Sequences flattened."""
  if spec is None:
    return []
  return [t for d in spec['decoders'] for t in _decoder_steps(d)] if spec['type'] == 'Sequence' else [spec['type']]


class ByteTokenizer:
  """UTF-8 bytes shifted past three specials (T5/ByT5 layout): pad 0, eos 1, unk 2; no training."""
  name = 'bytes'
  pad_id, eos_id, unk_id, bos_id = 0, 1, 2, None
  offset = 3
  vocab_size = 256 + 3

  def encode(self, text: str) -> list[int]:
    return [b + self.offset for b in text.encode('utf-8')]

  def decode(self, ids) -> str:
    # Specials and ids past the bytes (a model's vocabulary may be padded beyond this tokenizer's) are not text.
    return bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size).decode(
        'utf-8', errors='replace')

  def token_bytes(self) -> np.ndarray:
    lengths = np.ones(self.vocab_size, np.int32)
    lengths[:self.offset] = 0
    return lengths

  def byte_counts(self, ids) -> np.ndarray:
    return TableBytes(self.token_bytes()).counts(ids)

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

  @functools.cached_property
  def decoder_steps(self) -> list[str]:
    """The step types of the tokenizer.json decoder ('ByteLevel', 'Metaspace', ...): what its bytes depend on."""
    decoder = self.tokenizer.decoder
    return _decoder_steps(None if decoder is None else json.loads(decoder.__getstate__()))

  @functools.cached_property
  def _bytes(self) -> TableBytes | None:
    """Byte counts for ByteLevel and SentencePiece-style decoders; None for others (the module docstring)."""
    import tokenizers  # pylint: disable=g-import-not-at-top
    steps = self.decoder_steps
    if steps != ['ByteLevel'] and not (steps and set(steps) <= set(PIECE_DECODERS)):
      return None
    special = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
    pieces_V = [None if p in special else p for p in map(self.tokenizer.id_to_token, range(self.vocab_size))]
    if steps == ['ByteLevel']:
      # A byte-level piece spells one byte per character (decoding a lone id that holds part of a multi-byte
      # character would give U+FFFD); a piece with other characters (an added token) stays its own UTF-8.
      alphabet = set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
      return TableBytes(np.array([0 if p is None else len(p) if set(p) <= alphabet else len(p.encode('utf-8'))
                                  for p in pieces_V], np.int32))
    fallback = 'ByteFallback' in steps
    is_byte_V = [fallback and p is not None and BYTE_PIECE.fullmatch(p) is not None for p in pieces_V]
    return PieceBytes(pieces_V, is_byte_V, self.tokenizer.decoder.decode)

  def token_bytes(self) -> np.ndarray | None:
    """UTF-8 bytes per id inside a text (module docstring); None when the decoder is not one lmlab counts."""
    return None if self._bytes is None else self._bytes.table_V.copy()

  def byte_counts(self, ids) -> np.ndarray:
    """UTF-8 bytes per token of one encoded text, summing to the bytes of its decoded form."""
    if self._bytes is None:
      raise ValueError(f'{self.source or "this tokenizer"} has a {"+".join(self.decoder_steps) or "missing"} decoder, '
                       'whose bytes per token lmlab cannot count exactly (it counts ByteLevel and SentencePiece-style '
                       f'{"/".join(PIECE_DECODERS)} decoders); measure bits per byte with such a tokenizer')
    return self._bytes.counts(ids)

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

  @functools.cached_property
  def _bytes(self) -> PieceBytes:
    ids = range(self.vocab_size)
    return PieceBytes([None if self.sp.is_control(i) else self.sp.id_to_piece(i) for i in ids],
                      [self.sp.is_byte(i) for i in ids], self.sp.decode_pieces)

  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes per id inside a text (module docstring): '▁' is a space, a byte piece one byte."""
    return self._bytes.table_V.copy()

  def byte_counts(self, ids) -> np.ndarray:
    """UTF-8 bytes per token of one encoded text (the dummy-prefix space is not text), summing to its decoding."""
    return self._bytes.counts(ids)

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



def tokenizer_from_dict(info: dict | None, directory: str | None = None):
  """The tokenizer a `to_dict()` record describes (a checkpoint's metadata, an export's model.json); None for none.

  A record's `file` (an export's own tokenizer.json) is read from `directory`; otherwise its `source` path or,
  when that is gone (a workdir moved), the file of the same name in `directory`.
  """
  if not info:
    return None
  kind = info.get('kind')
  if kind == 'bytes':
    return ByteTokenizer()
  if kind not in ('hf', 'spm'):
    raise ValueError(f'tokenizer kind {kind!r} cannot be rebuilt; known: bytes, hf, spm')
  path = info.get('source') or ''
  if directory and (info.get('file') or not os.path.isfile(path)):
    path = os.path.join(directory, info.get('file') or os.path.basename(path))
  if not os.path.isfile(path):
    raise ValueError(f'{kind} tokenizer file {path!r} does not exist; the model was saved with it beside (export) or '
                     'at its recorded source (workdir): put it back there')
  if kind == 'spm':
    return SentencePieceTokenizer(path)
  return HFTokenizer.from_file(path, eos_id=info.get('eos_id'), bos_id=info.get('bos_id'), pad_id=info.get('pad_id'),
                               chat_template=info.get('chat_template'), add_bos=info.get('add_bos', False))
