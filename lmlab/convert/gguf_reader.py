"""A small GGUF v2/v3 parser: metadata as Python values, tensors as memory-mapped raw bytes.

gguf-py's GGUFReader builds a numpy view per metadata string (seconds for a 49k-token vocabulary)
and is not installed everywhere lmlab runs; this reads the same layout (ggml/docs/gguf.md) in
one pass with `struct`, and numeric arrays with `np.frombuffer`.
"""
import dataclasses
import struct

import numpy as np

from lmlab.convert import quants

# GGUF metadata value types -> struct format (scalars); 8 string, 9 array.
_SCALARS = {0: '<B', 1: '<b', 2: '<H', 3: '<h', 4: '<I', 5: '<i', 6: '<f', 7: '<?', 10: '<Q', 11: '<q', 12: '<d'}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
          10: np.uint64, 11: np.int64, 12: np.float64}
# ggml tensor type ids (ggml.h) -> names; only those in quants.SUPPORTED can be read.
GGML_TYPES = {0: 'F32', 1: 'F16', 2: 'Q4_0', 3: 'Q4_1', 6: 'Q5_0', 7: 'Q5_1', 8: 'Q8_0', 9: 'Q8_1', 10: 'Q2_K',
              11: 'Q3_K', 12: 'Q4_K', 13: 'Q5_K', 14: 'Q6_K', 15: 'Q8_K', 16: 'IQ2_XXS', 17: 'IQ2_XS',
              18: 'IQ3_XXS', 19: 'IQ1_S', 20: 'IQ4_NL', 21: 'IQ3_S', 22: 'IQ2_S', 23: 'IQ4_XS', 24: 'I8', 25: 'I16',
              26: 'I32', 27: 'I64', 28: 'F64', 29: 'IQ1_M', 30: 'BF16', 34: 'TQ1_0', 35: 'TQ2_0', 39: 'MXFP4'}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str
  kind: str                    # ggml type name, e.g. Q4_1
  shape: tuple[int, ...]       # numpy order (GGUF lists dims fastest-first; this is reversed)
  offset: int                  # absolute byte offset in the file

  def nbytes(self) -> int:
    n = int(np.prod(self.shape))
    if self.kind in quants.BLOCK_BYTES:
      return n // quants.BLOCK * quants.BLOCK_BYTES[self.kind]
    return n * quants.FLOAT_BYTES[self.kind]


class _Cursor:
  def __init__(self, buf):
    self.buf, self.pos = buf, 0

  def unpack(self, fmt: str):
    (value,) = struct.unpack_from(fmt, self.buf, self.pos)
    self.pos += struct.calcsize(fmt)
    return value

  def string(self) -> str:
    n = self.unpack('<Q')
    self.pos += n
    return bytes(self.buf[self.pos - n:self.pos]).decode('utf-8', errors='replace')

  def value(self, kind: int):
    if kind == 6:  # float32: 1e-5 would come back as 9.99999975e-06; keep the decimal that was written
      return float(np.format_float_positional(np.float32(self.unpack('<f')), unique=True))
    if kind in _SCALARS:
      return self.unpack(_SCALARS[kind])
    if kind == 8:
      return self.string()
    if kind != 9:
      raise ValueError(f'GGUF metadata value type {kind} is unknown; is the file corrupt?')
    item, n = self.unpack('<I'), self.unpack('<Q')
    if item in _NUMPY:
      size = np.dtype(_NUMPY[item]).itemsize
      self.pos += n * size
      return np.frombuffer(self.buf, _NUMPY[item], n, self.pos - n * size).tolist()
    return [self.value(item) for _ in range(n)]


def read(path: str) -> tuple[dict, dict[str, TensorInfo], np.memmap]:
  """(metadata, tensor infos by name, the whole file memory-mapped)."""
  data = np.memmap(path, dtype=np.uint8, mode='r')
  if bytes(data[:4]) != b'GGUF':
    raise ValueError(f'{path} is not a GGUF file (magic {bytes(data[:4])!r})')
  c = _Cursor(memoryview(data))
  c.pos = 4
  version = c.unpack('<I')
  if version not in (2, 3):
    raise ValueError(f'{path} is GGUF version {version}; lmlab reads versions 2 and 3')
  n_tensors, n_meta = c.unpack('<Q'), c.unpack('<Q')
  meta = {}
  for _ in range(n_meta):
    key = c.string()
    meta[key] = c.value(c.unpack('<I'))
  infos = []
  for _ in range(n_tensors):
    name = c.string()
    dims = [c.unpack('<Q') for _ in range(c.unpack('<I'))]
    kind_id, offset = c.unpack('<I'), c.unpack('<Q')
    infos.append((name, GGML_TYPES.get(kind_id, f'type {kind_id}'), tuple(reversed(dims)), offset))
  align = int(meta.get('general.alignment', 32))
  start = (c.pos + align - 1) // align * align
  tensors = {name: TensorInfo(name, kind, shape, start + offset) for name, kind, shape, offset in infos}
  return meta, tensors, data


def tensor_bytes(data: np.memmap, info: TensorInfo) -> np.ndarray:
  return data[info.offset:info.offset + info.nbytes()]
