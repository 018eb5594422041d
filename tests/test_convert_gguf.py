"""GGUF: block dequantisation against hand-built blocks and gguf-py, llama.cpp's Q/K permutation,
a tiny GGUF file written with gguf-py read back exactly, and refusals."""
import dataclasses

import numpy as np
import pytest

gguf = pytest.importorskip('gguf', reason='the gguf package (pip install gguf) reads and writes GGUF files')

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from lmlab import convert  # pylint: disable=g-import-not-at-top,wrong-import-position
from lmlab.convert import gguf as gguf_io, gguf_reader, mapping, quants, testing  # pylint: disable=g-import-not-at-top,wrong-import-position
from lmlab.models import layers  # pylint: disable=g-import-not-at-top,wrong-import-position

Q = gguf.GGMLQuantizationType
f16 = lambda x: np.float16(x).tobytes()
# Nibble pattern used by the 4-bit blocks: byte j holds j in its low and 15-j in its high nibble.
QS = bytes((j & 0xF) | ((15 - j) << 4) for j in range(16))
NIBBLES = np.array(list(range(16)) + [15 - j for j in range(16)], np.float32)


def hand_blocks():
  """(kind, raw bytes of two blocks = one row of 64, exact expected values)."""
  q8 = np.arange(-16, 16, dtype=np.int8)
  return [
      ('Q8_0', f16(0.5) + q8.tobytes() + f16(-2.0) + q8[::-1].tobytes(),
       np.concatenate([0.5 * q8, -2.0 * q8[::-1]])),
      ('Q4_0', f16(0.25) + QS + f16(3.0) + QS, np.concatenate([0.25 * (NIBBLES - 8), 3.0 * (NIBBLES - 8)])),
      ('Q4_1', f16(0.5) + f16(-1.0) + QS + f16(2.0) + f16(0.125) + QS,
       np.concatenate([0.5 * NIBBLES - 1.0, 2.0 * NIBBLES + 0.125])),
  ]


@pytest.mark.parametrize('kind, raw, expected', hand_blocks(), ids=lambda v: v if isinstance(v, str) else '')
def test_dequantize_hand_built_blocks(kind, raw, expected):
  data = np.frombuffer(raw, np.uint8).reshape(1, -1)
  got = quants.dequantize(data, kind, (1, 64))
  np.testing.assert_array_equal(got, expected[None].astype(np.float32))
  np.testing.assert_array_equal(got, gguf.quants.dequantize(data, Q[kind]))


def test_dequantize_floats():
  values = np.array([1.5, -2.25, 0.0, -1024.0], np.float32)
  np.testing.assert_array_equal(quants.dequantize(values.view(np.uint8), 'F32', (2, 2)), values.reshape(2, 2))
  np.testing.assert_array_equal(quants.dequantize(values.astype(np.float16).view(np.uint8), 'F16', (4,)), values)
  bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)  # these values are exact in bfloat16
  np.testing.assert_array_equal(quants.dequantize(bf16.view(np.uint8), 'BF16', (4,)), values)


@pytest.mark.parametrize('kind', ['Q8_0', 'Q4_0', 'Q4_1', 'F16'])
def test_dequantize_matches_gguf_py_on_random_rows(kind):
  w = np.random.RandomState(0).standard_normal((6, 96)).astype(np.float32)
  data = gguf.quants.quantize(w, Q[kind])
  np.testing.assert_array_equal(quants.dequantize(data, kind, w.shape), gguf.quants.dequantize(data, Q[kind]))


def interleaved_rope(x_LHK, base):
  """llama.cpp's default (NORM) RoPE: rotates adjacent pairs (x[2i], x[2i+1])."""
  L, _, K = x_LHK.shape
  angles_Lk = np.arange(L)[:, None] * base ** (-np.arange(0, K, 2) / K)
  cos, sin = np.cos(angles_Lk)[:, None], np.sin(angles_Lk)[:, None]
  x0, x1 = x_LHK[..., 0::2], x_LHK[..., 1::2]
  out = np.empty_like(x_LHK)
  out[..., 0::2], out[..., 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
  return out


def test_unpermuted_qk_give_the_attention_scores_llama_cpp_computes():
  H, G, K, D, L, base = 4, 2, 8, 16, 5, 100.0
  rng = np.random.RandomState(0)
  wq, wk, x = rng.standard_normal((H * K, D)), rng.standard_normal((G * K, D)), rng.standard_normal((L, D))
  gq, gk = gguf_io.permute(wq, H), gguf_io.permute(wk, G)  # what a GGUF file stores
  np.testing.assert_array_equal(gguf_io.unpermute(gq, H), wq)
  # lmlab: un-permuted weights, half-split RoPE.
  rope = lambda w, n: np.asarray(layers.rope(jnp.asarray((x @ gguf_io.unpermute(w, n).T).reshape(1, L, n, K)),
                                             jnp.arange(L)[None], base))[0]
  q_half, k_half = rope(gq, H), rope(gk, G)
  # llama.cpp: stored (permuted) weights, interleaved RoPE.
  q_int = interleaved_rope((x @ gq.T).reshape(L, H, K), base)
  k_int = interleaved_rope((x @ gk.T).reshape(L, G, K), base)
  # Same per-head vectors up to the row permutation, hence the same attention scores.
  np.testing.assert_allclose(gguf_io.permute(q_half.reshape(L, H * K).T, H).T.reshape(L, H, K), q_int, atol=1e-5)
  scores = lambda q, k: np.einsum('lgrk,sgk->grls', q.reshape(L, G, H // G, K), k)
  np.testing.assert_allclose(scores(q_half, k_half), scores(q_int, k_int), atol=1e-4)


TYPES = [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1]


def write_tiny_gguf(path, config, tensors, arch='llama', with_tokenizer=True, force_type=None):
  """A llama-family GGUF file the way convert_hf_to_gguf.py writes one: Q/K rows permuted, weights quantised."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(config.num_layers)
  w.add_context_length(config.max_len)
  w.add_embedding_length(config.d_model)
  w.add_feed_forward_length(config.ffn_dim)
  w.add_head_count(config.num_heads)
  w.add_head_count_kv(config.num_kv_heads)
  w.add_layer_norm_rms_eps(config.norm_eps)
  w.add_rope_freq_base(config.rope_base)
  w.add_vocab_size(config.vocab_size)
  if with_tokenizer:
    from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + ['he', 'll', 'hell', 'Ġw', '<s>', '</s>']
    tokens += [f'<unused{i}>' for i in range(config.vocab_size - len(tokens))]
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre('default')
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ('<s>', '</s>') else 1 for t in tokens])
    w.add_token_merges(['h e', 'l l', 'he ll', 'Ġ w'])
    w.add_bos_token_id(tokens.index('<s>'))
    w.add_eos_token_id(tokens.index('</s>'))
    w.add_add_bos_token(True)
    w.add_chat_template('{{ messages }}')
  expected = {}
  for i, (name, value) in enumerate(sorted(tensors.items())):
    gname = gguf_io.GGUFFile.gguf_name(name)
    # llama.cpp stores llama's Q/K rows permuted (qwen2's are not): permute on write, undo on the expected side.
    heads = {'.attn_q.': config.num_heads, '.attn_k.': config.num_kv_heads}
    permuted = next((h for key, h in heads.items() if key in gname), None) if arch == 'llama' else None
    if permuted:
      value = gguf_io.permute(value, permuted)
    kind = force_type if force_type is not None else (Q.F32 if value.ndim == 1 else TYPES[i % len(TYPES)])
    data = gguf.quants.quantize(value, kind)
    w.add_tensor(gname, data, raw_dtype=kind)
    back = gguf.quants.dequantize(data, kind).reshape(value.shape)
    expected[name] = gguf_io.unpermute(back, permuted) if permuted else back
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return expected


@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
def test_tiny_gguf_loads_exactly(tmp_path, arch):
  config = dataclasses.replace(testing.TINY[arch], vocab_size=288)  # room for the byte-level alphabet
  tensors = mapping.params_to_hf(config, testing.random_params(config))
  expected = write_tiny_gguf(tmp_path / 'tiny.gguf', config, tensors, arch=arch)
  config2, params, tokenizer = convert.load_pretrained(str(tmp_path / 'tiny.gguf'))
  assert testing.same_config(config, config2), f'{config}\n!=\n{config2}'
  want = mapping.params_from_hf(config, expected.__getitem__, expected.__contains__)
  for name, value in mapping.flatten(want).items():
    np.testing.assert_array_equal(mapping.flatten(params)[name], value, err_msg=name)
  ids = tokenizer.encode('hello world')
  assert ids[0] == tokenizer.bos_id and tokenizer.eos_id == tokenizer.bos_id + 1, ids
  assert tokenizer.tokenizer.id_to_token(ids[1]) == 'hell' and tokenizer.decode(ids) == 'hello world'
  assert tokenizer.chat_template == '{{ messages }}'


def test_unsupported_gguf_type_and_architecture_refused(tmp_path):
  config = testing.TINY['llama']
  tensors = mapping.params_to_hf(config, testing.random_params(config))
  write_tiny_gguf(tmp_path / 'q5.gguf', config, tensors, with_tokenizer=False, force_type=Q.Q5_0)
  with pytest.raises(ValueError, match=r'is Q5_0 .*dequantises F32, F16, BF16, Q8_0, Q4_0, Q4_1'):
    convert.load_pretrained(str(tmp_path / 'q5.gguf'))
  write_tiny_gguf(tmp_path / 'falcon.gguf', config, {}, arch='falcon', with_tokenizer=False)
  with pytest.raises(ValueError, match="GGUF architecture 'falcon'"):
    convert.load_pretrained(str(tmp_path / 'falcon.gguf'))


def test_gguf_mixture_of_experts_refused(tmp_path):
  w = gguf.GGUFWriter(str(tmp_path / 'moe.gguf'), 'llama')
  for key, value in dict(block_count=1, embedding_length=32, feed_forward_length=32, head_count=2).items():
    getattr(w, f'add_{key}')(value)
  w.add_expert_count(8)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match='mixture-of-experts'):
    convert.load_pretrained(str(tmp_path / 'moe.gguf'))


def test_own_reader_agrees_with_gguf_py(tmp_path):
  config = dataclasses.replace(testing.TINY['llama'], vocab_size=288)
  write_tiny_gguf(tmp_path / 'tiny.gguf', config, mapping.params_to_hf(config, testing.random_params(config)))
  meta, tensors, data = gguf_reader.read(str(tmp_path / 'tiny.gguf'))
  reference = gguf.GGUFReader(str(tmp_path / 'tiny.gguf'))
  for key, field in reference.fields.items():
    if not key.startswith('GGUF.'):
      value = field.contents()
      if isinstance(value, float):  # ours keeps the shortest float32 decimal (1e-5, not 9.99999975e-06)
        assert np.float32(meta[key]) == np.float32(value), key
      else:
        assert meta[key] == value, key
  for t in reference.tensors:
    info = tensors[t.name]
    assert (info.kind, info.shape) == (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape))), t.name
    np.testing.assert_array_equal(gguf_reader.tensor_bytes(data, info), t.data.reshape(-1).view(np.uint8),
                                  err_msg=t.name)
