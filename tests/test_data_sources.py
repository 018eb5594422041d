"""Files, TFDS and mixture sources, and the prefetch thread's exact state."""
import collections
import gzip
import json
import threading
import time

import numpy as np
import pytest

from experiments.configs.base import get_base_config
from lmlab.data import ByteTokenizer, make_batches, pipeline, sources


def _config(**overrides):
  c = get_base_config().data
  c.update(overrides)
  return c


def _write_jsonl(path, records):
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'wt') as f:
    f.write(''.join(r if isinstance(r, str) else json.dumps(r) + '\n' for r in records))


def _all_docs(source):
  return [source[i] for i in range(len(source))]


def test_files_txt_one_document_per_file_or_per_block(tmp_path):
  (tmp_path / 'a.txt').write_text('first\n\nsecond block\n  \n\n\nthird')
  (tmp_path / 'b.txt').write_text('other file')
  c = _config(validation_fraction=0.0)
  whole = sources.make_source(f'files:{tmp_path}/*.txt', c, 'train')
  assert sorted(_all_docs(whole)) == ['first\n\nsecond block\n  \n\n\nthird', 'other file']
  c.txt_split_blank_lines = True
  blocks = sources.make_source(f'files:{tmp_path}/*.txt', c, 'train')
  assert sorted(_all_docs(blocks)) == ['first', 'other file', 'second block', 'third']


def test_files_jsonl_and_gz_with_split_placeholder(tmp_path):
  _write_jsonl(tmp_path / 'train.jsonl', [{'text': 'a'}, {'text': 'b'}, '\n', {'text': 'c'}])
  _write_jsonl(tmp_path / 'validation.jsonl.gz', [{'body': 'v'}])
  c = _config(text_key='text')
  assert _all_docs(sources.make_source(f'files:{tmp_path}/{{split}}.jsonl*', c, 'train')) == ['a', 'b', 'c']
  c.text_key = 'body'
  assert _all_docs(sources.make_source(f'files:{tmp_path}/{{split}}.jsonl*', c, 'validation')) == ['v']


def test_files_hash_split_is_disjoint(tmp_path):
  _write_jsonl(tmp_path / 'd.jsonl', [{'text': str(i)} for i in range(200)])
  c = _config(validation_fraction=0.2)
  train, valid = (set(_all_docs(sources.make_source(f'files:{tmp_path}/*.jsonl', c, s))) for s in
                  ('train', 'validation'))
  assert not train & valid and len(train | valid) == 200 and 20 < len(valid) < 60


@pytest.mark.parametrize('line', ['{"text": "broken\n', '{"other": 1}\n'], ids=['malformed', 'missing_field'])
def test_files_bad_record_error_names_file_and_line(tmp_path, line):
  path = tmp_path / 'bad.jsonl'
  _write_jsonl(path, [{'text': 'fine'}, line, {'text': 'also fine'}])
  source = sources.make_source(f'files:{path}', _config(validation_fraction=0.0), 'train')
  with pytest.raises(ValueError, match=f'{path}:2: .*on_bad_record=skip'):
    _all_docs(source)


def test_files_bad_record_skip_counts(tmp_path):
  path = tmp_path / 'bad.jsonl'
  _write_jsonl(path, [{'text': 'fine'}, '{oops\n', {'text': 'also fine'}, '{"text": 3}\n'])
  c = _config(source=f'files:{path}', validation_fraction=0.0, on_bad_record='skip')
  it = make_batches(c, ByteTokenizer(), split='train', global_batch_size=2, seq_len=32, seed=0, shuffle=False,
                    repeat=False, process_index=0, process_count=1)
  text = ByteTokenizer().decode(next(it)['inputs'].ravel())
  assert 'fine' in text and 'also fine' in text and it.skipped_records == 2


def test_files_errors_are_one_line(tmp_path):
  with pytest.raises(ValueError, match='matched no files'):
    sources.make_source(f'files:{tmp_path}/*.jsonl', _config(), 'train')
  (tmp_path / 'x.csv').write_text('a')
  with pytest.raises(ValueError, match='unsupported file type'):
    sources.make_source(f'files:{tmp_path}/x.csv', _config(), 'train')
  with pytest.raises(ValueError, match='SOURCE:WEIGHT'):
    sources.parse_mixture(_config(mixture='stdlib:0.5,stdlib'))


def test_mixture_follows_weights_and_resumes_exactly():
  class Constant:
    def __init__(self, name, n):
      self.name, self.n = name, n
    def __len__(self):
      return self.n
    def __getitem__(self, i):
      return self.name

  def make():
    return pipeline.batches_from_sources([Constant('a', 5), Constant('b', 7)], [0.8, 0.2], ByteTokenizer(),
                                         global_batch_size=50, seq_len=8, seed=1, shuffle=True, repeat=True,
                                         shuffle_window=64, prefetch=2, process_index=0, process_count=1)
  it = make()
  counts = collections.Counter()
  for _ in range(20):
    inputs = next(it)['inputs']
    counts.update({'a': int((inputs == ord('a') + 3).sum()), 'b': int((inputs == ord('b') + 3).sum())})
  assert abs(counts['a'] / (counts['a'] + counts['b']) - 0.8) < 0.03, counts
  state = it.get_state()
  expected = next(it)
  resumed = make()
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)['inputs'], expected['inputs'])


def test_finite_mixture_drains_every_source():
  docs = pipeline.batches_from_sources([['x'] * 3, ['y'] * 9], [0.9, 0.1], ByteTokenizer(), global_batch_size=64,
                                       seq_len=4, seed=0, shuffle=False, repeat=False, shuffle_window=8,
                                       process_index=0, process_count=1)
  inputs = np.concatenate([b['inputs'] for b in docs])
  assert (inputs == ord('x') + 3).sum() == 3 and (inputs == ord('y') + 3).sum() == 9


def test_prefetch_yields_the_same_batches_and_consumed_state():
  c = _config()
  def make(prefetch):
    c.prefetch = prefetch
    return make_batches(c, ByteTokenizer(), split='train', global_batch_size=4, seq_len=32, seed=5,
                        process_index=0, process_count=1)
  plain, ahead = make(0), make(4)
  for _ in range(6):
    np.testing.assert_array_equal(next(plain)['inputs'], next(ahead)['inputs'])
    assert plain.get_state() == ahead.get_state()
  ahead.close()


def test_tfds_mock_data_source():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6):
    source = sources.make_source('tfds:imdb_reviews', _config(), 'train')
    assert len(source) == 6 and all(isinstance(d, str) and d for d in _all_docs(source))
    it = make_batches(_config(source='tfds:imdb_reviews', eval_split='test'), ByteTokenizer(), split='test',
                      global_batch_size=2, seq_len=16, seed=0, shuffle=False, process_index=0, process_count=1)
    assert next(it)['weights'].sum() > 0


def test_tfds_real_array_record_dataset(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')

  class LmlabTinyText(tfds.core.GeneratorBasedBuilder):
    """Three documents written as array_record, read back without TensorFlow."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {'text': f'doc {i}'}

  LmlabTinyText(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  source = sources.make_source('tfds:lmlab_tiny_text', _config(tfds_data_dir=str(tmp_path)), 'train')
  assert sorted(_all_docs(source)) == ['doc 0', 'doc 1', 'doc 2']
  with pytest.raises(ValueError, match="no feature 'body'"):
    sources.make_source('tfds:lmlab_tiny_text', _config(tfds_data_dir=str(tmp_path), text_key='body'), 'train')


def test_tfds_not_prepared_says_where_and_how(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(ValueError, match=f'not prepared in {tmp_path}.*tfds build imdb_reviews '
                                              f'--data_dir={tmp_path}'):
    sources.make_source('tfds:imdb_reviews', _config(tfds_data_dir=str(tmp_path)), 'train')


def test_prefetch_thread_forwards_errors_and_stops_when_dropped(tmp_path):
  path = tmp_path / 'bad.jsonl'
  _write_jsonl(path, [{'text': 'fine'}, '{oops\n'])
  c = _config(source=f'files:{path}', validation_fraction=0.0, prefetch=2)
  before = threading.active_count()
  it = make_batches(c, ByteTokenizer(), split='train', global_batch_size=2, seq_len=8, seed=0, shuffle=False,
                    process_index=0, process_count=1)
  with pytest.raises(ValueError, match='bad.jsonl:2'):
    next(it)
  with pytest.raises(ValueError, match='bad.jsonl:2'):
    next(it)
  c.source, c.validation_fraction = 'stdlib', 0.05
  for _ in range(3):
    next(make_batches(c, ByteTokenizer(), split='validation', global_batch_size=2, seq_len=8, seed=0,
                      shuffle=False, process_index=0, process_count=1))
  deadline = time.time() + 2
  while threading.active_count() > before and time.time() < deadline:
    time.sleep(0.05)
  assert threading.active_count() == before


def test_fingerprints_of_files_and_mixtures(tmp_path):
  _write_jsonl(tmp_path / 'a.jsonl', [{'text': 'x'}])
  c = _config(source=f'files:{tmp_path}/*.jsonl')
  first = pipeline.corpus_fingerprint(c)
  assert first['files'] == 1 and first['bytes'] == len('{"text": "x"}\n')
  _write_jsonl(tmp_path / 'a.jsonl', [{'text': 'y'}])
  assert pipeline.corpus_fingerprint(c)['sha256'] != first['sha256']
  c.mixture = f'stdlib:1,files:{tmp_path}/*.jsonl:3'
  mixture = pipeline.corpus_fingerprint(c)['mixture']
  assert [m['source'] for m in mixture] == ['stdlib', f'files:{tmp_path}/*.jsonl'] and mixture[1]['weight'] == 3
