"""Packing, resumable state, stdlib split and host slicing of the data pipeline."""
import json

import jax
import numpy as np
import pytest

from experiments.configs.base import get_base_config
from lmlab import sharding
from lmlab.data import ByteTokenizer, make_batches, pipeline, sources, to_global

EOS, PAD = ByteTokenizer.eos_id, ByteTokenizer.pad_id


class ListSource(list):
  name = 'list'


def _ids(text):
  return [b + ByteTokenizer.offset for b in text.encode()]


def _batches(docs, seq_len, batch, **kwargs):
  kwargs = {'seed': 0, 'shuffle': False, 'repeat': False, 'shuffle_window': 4, 'process_index': 0,
            'process_count': 1, **kwargs}
  return pipeline.batches_from_sources([ListSource(docs)], [1.0], ByteTokenizer(), global_batch_size=batch,
                                       seq_len=seq_len, **kwargs)


def _stdlib(split='train', batch=4, seq_len=32, window=8, **kwargs):
  c = get_base_config().data
  c.shuffle_window = window
  return make_batches(c, ByteTokenizer(), split=split, global_batch_size=batch, seq_len=seq_len, seed=0,
                      process_index=0, process_count=1, **kwargs)


def test_packing_puts_eos_between_documents_and_masks_crossings():
  # Stream: a b E c d e f E g E, rows of 5 tokens with stride 4; the last row is padded.
  a, b, c, d, e, f, g = _ids('abcdefg')
  batch = next(_batches(['ab', 'cdef', 'g'], seq_len=4, batch=4))
  np.testing.assert_array_equal(batch['inputs'], [[a, b, EOS, c], [d, e, f, EOS], [g, EOS, PAD, PAD], [PAD] * 4])
  np.testing.assert_array_equal(batch['targets'], [[b, EOS, c, d], [e, f, EOS, g], [EOS, PAD, PAD, PAD], [PAD] * 4])
  np.testing.assert_array_equal(batch['segment_ids'], [[1, 1, 1, 2], [1, 1, 1, 1], [1, 1, 0, 0], [0] * 4])
  np.testing.assert_array_equal(batch['positions'], [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 0], [0] * 4])
  np.testing.assert_array_equal(batch['weights'], [[1, 1, 0, 1], [1, 1, 1, 0], [1, 0, 0, 0], [0] * 4])
  assert {k: v.dtype for k, v in batch.items()} == {
      'inputs': np.int32, 'targets': np.int32, 'segment_ids': np.int32, 'positions': np.int32,
      'weights': np.float32}


def test_finite_stream_ends_and_skips_empty_documents():
  it = _batches(['ab', '', 'cd'], seq_len=8, batch=2)
  batch = next(it)
  np.testing.assert_array_equal(batch['inputs'][0], _ids('ab') + [EOS] + _ids('cd') + [EOS, PAD, PAD])
  with pytest.raises(StopIteration):
    next(it)


def test_weights_never_cross_documents_on_stdlib():
  batch = next(_stdlib(batch=16, seq_len=256))
  w, seg = batch['weights'], batch['segment_ids']
  assert not w[batch['inputs'] == EOS].any(), 'an EOS input predicts the next document'
  assert not w[seg == 0].any()
  assert w.sum() > 0.9 * w.size
  # A new segment starts exactly where the previous token's target was not weighted (or at row start).
  starts = np.diff(seg, axis=1) != 0
  np.testing.assert_array_equal(starts, w[:, :-1] == 0)
  assert (batch['positions'][:, 1:][starts] == 0).all()


@pytest.mark.parametrize('make', [
    lambda: _stdlib(window=8),
    lambda: _batches(['one', 'two two', 'three three three'], seq_len=4, batch=2, shuffle=True, repeat=True),
], ids=['stdlib', 'epochs'])
def test_state_round_trip_is_bitwise(make):
  it = make()
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  resumed = make()
  resumed.set_state(state)
  for want, got in zip(expected, [next(resumed) for _ in range(3)]):
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_state_version_mismatch_is_an_error():
  with pytest.raises(ValueError, match='version'):
    _stdlib().set_state({'version': 0})


def test_stdlib_split_is_deterministic_and_disjoint():
  train, valid = sources.StdlibSource('train', 0.05), sources.StdlibSource('validation', 0.05)
  assert not set(train.paths) & set(valid.paths)
  assert sorted(train.paths + valid.paths) == sorted(
      sources.stdlib_paths() + [sources.TOPICS_PREFIX + k for k in sources.stdlib_topics()])
  assert 0.02 < len(valid) / (len(train) + len(valid)) < 0.1
  assert sources.StdlibSource('validation', 0.05).paths == valid.paths
  # Golden values: the split must not depend on the machine or the Python hash seed.
  assert sources.path_fraction('os.py') == pytest.approx(0.850948727781281)
  assert not any(p.startswith(('site-packages', 'test/')) or '/tests/' in p for p in train.paths)


def test_eval_batches_do_not_depend_on_seed():
  first = next(_stdlib('validation', shuffle=False, repeat=False))
  c = get_base_config().data
  other = next(make_batches(c, ByteTokenizer(), split='validation', global_batch_size=4, seq_len=32, seed=7,
                            shuffle=False, repeat=False, process_index=0, process_count=1))
  np.testing.assert_array_equal(first['inputs'], other['inputs'])


def test_host_slices_are_disjoint_and_cover_the_global_batch():
  c = get_base_config().data
  def host(i, n):
    return make_batches(c, ByteTokenizer(), split='train', global_batch_size=4, seq_len=32, seed=3,
                        process_index=i, process_count=n)
  whole, h0, h1 = host(0, 1), host(0, 2), host(1, 2)
  for _ in range(3):
    full, a, b = next(whole), next(h0), next(h1)
    assert a['inputs'].shape == (2, 32)
    for k in full:
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), full[k], err_msg=k)


def test_batch_not_divisible_by_processes_is_an_error():
  with pytest.raises(ValueError, match='not divisible by the 3 processes'):
    _batches(['a'], seq_len=4, batch=4, process_count=3)


def test_to_global_shards_rows_over_the_mesh():
  mesh = sharding.make_mesh({'data': -1})
  batch = next(_stdlib(batch=8))
  arrays = to_global(batch, mesh)
  for k, v in batch.items():
    assert arrays[k].shape == v.shape and arrays[k].sharding == sharding.batch_sharding(mesh)
    np.testing.assert_array_equal(jax.device_get(arrays[k]), v)


def test_stdlib_fingerprint_counts_files():
  fp = pipeline.corpus_fingerprint(get_base_config().data)
  assert fp['source'] == 'stdlib' and fp['files'] > 500 and fp['bytes'] > 5e6 and len(fp['sha256']) == 64
