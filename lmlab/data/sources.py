"""Document sources: random-access sequences of text documents, one split each.

Every source is `len(source)` documents and `source[i] -> str` (with a `name`), so the pipeline can
shuffle document order per epoch with a seeded permutation and resume from a (epoch, index) cursor
without replay. An empty string is a document to skip (the packer drops it).

  stdlib            the running interpreter's standard library + pydoc topics, split by path hash
  tfds:NAME[:VER]   a TFDS dataset prepared as array_record, read with `tfds.data_source` (no TensorFlow)
  files:GLOB        .txt / .jsonl / .jsonl.gz files; `{split}` in GLOB picks files per split, otherwise
                    documents are split by a hash of (relative path, index) like stdlib
"""
import glob
import gzip
import hashlib
import json
import mmap
import os
import re
import sysconfig

from absl import logging
import numpy as np

# Test suites are mostly fixtures and odd encodings rather than representative code; topics.py is a
# 750 KB dict literal whose entries are served one per document below instead.
STDLIB_EXCLUDED_DIRS = frozenset({'site-packages', 'dist-packages', 'test', 'tests', 'idle_test', '__pycache__'})
STDLIB_EXCLUDED_FILES = frozenset({'pydoc_data/topics.py'})
TOPICS_PREFIX = 'pydoc_data/topics/'


def path_fraction(path: str) -> float:
  """A path's stable position in [0, 1): sha256, not `hash`, so every machine splits alike."""
  return int.from_bytes(hashlib.sha256(path.encode('utf-8')).digest()[:8], 'big') / 2.0**64


def split_of(path: str, validation_fraction: float) -> str:
  return 'validation' if path_fraction(path) < validation_fraction else 'train'


def stdlib_root() -> str:
  return sysconfig.get_paths()['stdlib']


def stdlib_paths() -> list[str]:
  """Relative posix paths of the stdlib's `.py` modules (no tests, no site-packages), sorted."""
  root = stdlib_root()
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
    rel_dir = os.path.relpath(dirpath, root).replace(os.sep, '/')
    for name in filenames:
      rel = name if rel_dir == '.' else f'{rel_dir}/{name}'
      if name.endswith('.py') and rel not in STDLIB_EXCLUDED_FILES:
        paths.append(rel)
  return sorted(paths)


def stdlib_topics() -> dict[str, str]:
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  return topics


class StdlibSource:
  """The running interpreter's standard library sources plus pydoc help topics, one document each."""

  def __init__(self, split: str, validation_fraction: float):
    if split not in ('train', 'validation'):
      raise ValueError(f"stdlib source has splits 'train' and 'validation', got {split!r}; "
                       'set data.train_split / data.eval_split to one of them')
    self.name = f'stdlib/{split}'
    self.root = stdlib_root()
    self.topics = stdlib_topics()
    names = stdlib_paths() + [TOPICS_PREFIX + k for k in sorted(self.topics)]
    self.paths = [p for p in names if split_of(p, validation_fraction) == split]

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> str:
    return _stdlib_bytes(self.root, self.topics, self.paths[i]).decode('utf-8', errors='replace')


def _stdlib_bytes(root: str, topics: dict[str, str], path: str) -> bytes:
  if path.startswith(TOPICS_PREFIX):
    return topics[path[len(TOPICS_PREFIX):]].encode('utf-8')
  with open(os.path.join(root, path), 'rb') as f:
    return f.read()


def stdlib_fingerprint() -> dict:
  """What the stdlib corpus is on this machine, so runs on different interpreters can be told apart."""
  root, topics = stdlib_root(), stdlib_topics()
  digest = hashlib.sha256()
  files = total = 0
  for path in stdlib_paths() + [TOPICS_PREFIX + k for k in sorted(topics)]:
    content = _stdlib_bytes(root, topics, path)
    digest.update(path.encode('utf-8') + b'\0' + hashlib.sha256(content).digest())
    files += 1
    total += len(content)
  return {'source': 'stdlib', 'root': root, 'files': files, 'bytes': total, 'sha256': digest.hexdigest()}


class FilesSource:
  """Documents in local .txt / .jsonl / .jsonl.gz files, indexed by byte range and parsed on access.

  JSON is parsed when a document is read, not up front, so the first batch does not wait for the whole
  corpus; a bad record therefore surfaces (error) or is counted in `skipped` (skip) when it is reached.
  Plain files are memory-mapped; .gz files are held decompressed in memory.
  """

  def __init__(self, pattern: str, split: str, data_config):
    if data_config.on_bad_record not in ('error', 'skip'):
      raise ValueError(f'data.on_bad_record={data_config.on_bad_record!r}; use error or skip')
    self.name, self.text_key = f'files:{pattern}/{split}', data_config.text_key
    self.on_bad_record, self.skipped = data_config.on_bad_record, 0
    by_split = '{split}' in pattern
    pattern = pattern.replace('{split}', split)
    if not by_split and split not in ('train', 'validation'):
      raise ValueError(f"files source without '{{split}}' in its glob has splits 'train' and 'validation', got "
                       f"{split!r}; put '{{split}}' in the glob or use those split names")
    self.paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not self.paths:
      raise ValueError(f'data source files:{pattern} matched no files; check the glob')
    root = _glob_root(pattern)
    self._data, index = [], []
    for file_id, path in enumerate(self.paths):
      self._data.append(_read(path))
      rel = os.path.relpath(path, root).replace(os.sep, '/')
      for start, end, number in _documents(path, self._data[-1], data_config.txt_split_blank_lines):
        key = rel if number is None else f'{rel}:{number}'
        if by_split or split_of(key, data_config.validation_fraction) == split:
          index.append((file_id, start, end, number or 0))
    self._index = np.asarray(index, np.int64).reshape(-1, 4)

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i: int) -> str:
    file_id, start, end, line = (int(v) for v in self._index[i])
    raw = self._data[file_id][start:end]
    if _file_kind(self.paths[file_id]) == 'txt':
      return raw.decode('utf-8', errors='replace')
    try:
      record = json.loads(raw)
    except ValueError as error:
      return self._bad(file_id, line, f'malformed JSON ({error})')
    if not isinstance(record, dict) or not isinstance(record.get(self.text_key), str):
      return self._bad(file_id, line, f'no string field {self.text_key!r}')
    return record[self.text_key]

  def _bad(self, file_id: int, line: int, problem: str) -> str:
    where = f'{self.paths[file_id]}:{line}'
    if self.on_bad_record == 'error':
      raise ValueError(f'{where}: {problem}; fix the record or set data.on_bad_record=skip')
    self.skipped += 1
    logging.log_first_n(logging.WARNING, 'skipping bad record %s: %s', 20, where, problem)
    return ''


def jsonl_rows(path: str, keep=lambda number: True):
  """(line number, row) of every non-blank line of a .jsonl file that `keep(number)` selects; a line that is not
  JSON is a one-line error naming path:line (task, feedback and fine-tuning files share this reader)."""
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      if line.strip() and keep(number):
        try:
          yield number, json.loads(line)
        except json.JSONDecodeError as error:
          raise ValueError(f'{path}:{number}: malformed JSON ({error.msg}); write one JSON object per line') from None


def _file_kind(path: str) -> str:
  if path.endswith('.txt'):
    return 'txt'
  if path.endswith(('.jsonl', '.jsonl.gz')):
    return 'jsonl'
  raise ValueError(f'{path}: unsupported file type; files sources read .txt, .jsonl and .jsonl.gz')


def _read(path: str):
  """File contents as a bytes-like object: mmap for plain files, decompressed bytes for .gz."""
  if path.endswith('.gz'):
    with gzip.open(path, 'rb') as f:
      return f.read()
  with open(path, 'rb') as f:
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else b''


def _documents(path: str, data, split_blank_lines: bool) -> list[tuple[int, int, int | None]]:
  """(start, end, line or block number) of a file's documents; number None for a whole-file document."""
  if _file_kind(path) == 'jsonl':
    return _lines(data)
  return _blocks(data) if split_blank_lines else [(0, len(data), None)]


def _lines(data) -> list[tuple[int, int, int]]:
  """(start, end, 1-based line number) of each non-blank line."""
  ends = np.flatnonzero(np.frombuffer(data, np.uint8) == ord('\n')) if len(data) else np.zeros(0, np.int64)
  starts = np.r_[0, ends + 1]
  ends = np.r_[ends, len(data)]
  return [(int(s), int(e), n + 1) for n, (s, e) in enumerate(zip(starts, ends)) if data[s:e].strip()]


def _blocks(data) -> list[tuple[int, int, int]]:
  """(start, end, block number) of each blank-line-separated block with text in it."""
  bounds = [0] + [x for m in re.finditer(rb'\n(?:[ \t\r\f\v]*\n)+', data) for x in m.span()] + [len(data)]
  spans = [(bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2)]
  return [(s, e, n) for n, (s, e) in enumerate(spans) if data[s:e].strip()]


def _glob_root(pattern: str) -> str:
  """The directory part of a glob before its first wildcard: paths relative to it split stably."""
  parts = pattern.split('/')
  first_magic = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts) - 1)
  return '/'.join(parts[:first_magic]) or ('/' if pattern.startswith('/') else '.')


class TfdsSource:
  """A TFDS split through `tfds.data_source` (array_record random access, no TensorFlow needed)."""

  def __init__(self, name: str, split: str, data_config):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    except ImportError as error:
      raise ImportError(f'data.source tfds:{name} needs tensorflow-datasets and array-record; '
                        'pip install tensorflow-datasets array-record') from error
    self.name, self.text_key = f'tfds:{name}/{split}', data_config.text_key
    data_dir = data_config.tfds_data_dir or None
    try:
      self.data = tfds.data_source(name, split=split, data_dir=data_dir, download=data_config.tfds_download,
                                   builder_kwargs={'file_format': 'array_record'})  # What data_source reads.
    except tfds.core.registered.DatasetNotFoundError as error:
      raise ValueError(f'TFDS has no dataset {name!r}; check data.source (tfds.list_builders() lists them)') from error
    except Exception as error:  # pylint: disable=broad-except  (tfds raises several kinds for "not there")
      builder = tfds.builder(name, data_dir=data_dir)
      if builder.is_prepared():
        raise
      root = data_dir or tfds.core.constants.DATA_DIR
      why = (f'downloading it failed ({type(error).__name__}: {str(error).strip().splitlines()[0][:200]})'
             if data_config.tfds_download else 'data.tfds_download=False')
      raise ValueError(
          f'TFDS dataset {name} is not prepared in {builder.data_dir} (data_dir {root}) and {why}; prepare it with '
          f'`tfds build {name.split(":")[0]} --data_dir={root} --file_format=array_record` (needs tensorflow-cpu) '
          'or set data.tfds_data_dir') from error
    if len(self.data) and self.text_key not in self.data[0]:
      raise ValueError(f'{self.name} examples have no feature {self.text_key!r} (they have '
                       f'{sorted(self.data[0])}); set data.text_key')

  def __len__(self) -> int:
    return len(self.data)

  def __getitem__(self, i: int) -> str:
    text = self.data[i][self.text_key]
    text = text.item() if isinstance(text, np.ndarray) else text
    return text.decode('utf-8', errors='replace') if isinstance(text, bytes) else str(text)


def make_source(spec: str, data_config, split: str):
  """A source from its spec string (`stdlib`, `tfds:NAME[:VERSION]`, `files:GLOB`) for one split."""
  if spec == 'stdlib':
    return StdlibSource(split, data_config.validation_fraction)
  if spec.startswith('tfds:'):
    return TfdsSource(spec[len('tfds:'):], split, data_config)
  if spec.startswith('files:'):
    return FilesSource(spec[len('files:'):], split, data_config)
  raise ValueError(f'unknown data source {spec!r}; use stdlib, tfds:NAME[:VERSION] or files:GLOB')


def parse_mixture(data_config) -> list[tuple[str, float]]:
  """(source spec, weight) pairs: `data.mixture` ('SPEC:W,SPEC:W') when set, else `data.source` alone."""
  if not data_config.mixture:
    return [(data_config.source, 1.0)]
  pairs = []
  for entry in (e.strip() for e in data_config.mixture.split(',') if e.strip()):
    spec, _, weight = entry.rpartition(':')
    if not spec or not re.fullmatch(r'\d*\.?\d+(e-?\d+)?', weight) or float(weight) <= 0:
      raise ValueError(f"data.mixture entry {entry!r} is not SOURCE:WEIGHT with a weight > 0; "
                       "write e.g. 'stdlib:0.7,files:/data/*.jsonl:0.3'")
    pairs.append((spec, float(weight)))
  return pairs


def fingerprint(spec: str, data_config) -> dict:
  """Identity of one source's corpus: content hashes for local files, version and sizes for TFDS."""
  if spec == 'stdlib':
    return stdlib_fingerprint()
  if spec.startswith('files:'):
    pattern = spec[len('files:'):]
    paths = sorted(p for p in glob.glob(pattern.replace('{split}', '*'), recursive=True) if os.path.isfile(p))
    root, digest, total = _glob_root(pattern.replace('{split}', '*')), hashlib.sha256(), 0
    for path in paths:
      with open(path, 'rb') as f:
        content = f.read()
      digest.update(os.path.relpath(path, root).encode('utf-8') + b'\0' + hashlib.sha256(content).digest())
      total += len(content)
    return {'source': spec, 'files': len(paths), 'bytes': total, 'sha256': digest.hexdigest()}
  if spec.startswith('tfds:'):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    info = tfds.builder(spec[len('tfds:'):], data_dir=data_config.tfds_data_dir or None).info
    return {'source': spec, 'version': str(info.version),
            'examples': {name: split.num_examples for name, split in info.splits.items()}}
  raise ValueError(f'unknown data source {spec!r}; use stdlib, tfds:NAME[:VERSION] or files:GLOB')
