"""GGML block formats dequantised in numpy: F32, F16, BF16, Q8_0, Q4_0, Q4_1.

Each quantised row of n values is n/32 blocks laid out back to back (ggml-common.h):
  Q8_0: f16 d, int8 q[32]            -> x = d * q
  Q4_0: f16 d, uint8 qs[16]          -> x = d * (nibble - 8)
  Q4_1: f16 d, f16 m, uint8 qs[16]   -> x = d * nibble + m
The 4-bit blocks keep values 0..15 in the low nibbles of qs and values 16..31 in the high nibbles.
"""
import numpy as np

BLOCK = 32
# name -> (bytes per block of 32 values, or bytes per value for the plain float types)
BLOCK_BYTES = {'Q8_0': 2 + 32, 'Q4_0': 2 + 16, 'Q4_1': 2 + 2 + 16}
FLOAT_BYTES = {'F32': 4, 'F16': 2, 'BF16': 2}
SUPPORTED = tuple(FLOAT_BYTES) + tuple(BLOCK_BYTES)


def _nibbles(qs_NB16):
  """[..., 16] packed bytes -> [..., 32] values: low nibbles first, then high nibbles."""
  return np.concatenate([qs_NB16 & 0x0F, qs_NB16 >> 4], axis=-1).astype(np.float32)


def dequantize(data: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
  """Raw GGUF tensor bytes of type `kind` -> float32 array of `shape` (numpy order, last axis contiguous)."""
  raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
  n = int(np.prod(shape))
  if kind in FLOAT_BYTES:
    if kind == 'F32':
      out = raw.view(np.float32)
    elif kind == 'F16':
      out = raw.view(np.float16).astype(np.float32)
    else:  # bfloat16 is the top half of a float32
      out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return out[:n].reshape(shape).copy()
  if kind not in BLOCK_BYTES:
    raise ValueError(f'GGUF tensor type {kind} is not supported; supported: {", ".join(SUPPORTED)} '
                     '(requantise the file with llama-quantize)')
  if n % BLOCK:
    raise ValueError(f'{kind} tensor of shape {shape} has {n} values, not a multiple of the block size {BLOCK}')
  blocks_NX = raw[:n // BLOCK * BLOCK_BYTES[kind]].reshape(n // BLOCK, BLOCK_BYTES[kind])
  d_N1 = blocks_NX[:, :2].copy().view(np.float16).astype(np.float32)
  if kind == 'Q8_0':
    out_NB = d_N1 * blocks_NX[:, 2:].copy().view(np.int8).astype(np.float32)
  elif kind == 'Q4_0':
    out_NB = d_N1 * (_nibbles(blocks_NX[:, 2:]) - 8.0)
  else:  # Q4_1
    m_N1 = blocks_NX[:, 2:4].copy().view(np.float16).astype(np.float32)
    out_NB = d_N1 * _nibbles(blocks_NX[:, 4:]) + m_N1
  return out_NB.reshape(shape)
