"""Document sources: random-access sequences of text documents, one split each.

Every source is `len(source)` documents and `source[i] -> str`, so the pipeline can shuffle document
order per epoch with a seeded permutation and resume from a (epoch, index) cursor without replay.
"""
import hashlib
import os
import sysconfig

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


def make_source(spec: str, data_config, split: str):
  """A source from its spec string (`stdlib`, ...) for one split."""
  if spec == 'stdlib':
    return StdlibSource(split, data_config.validation_fraction)
  raise ValueError(f'unknown data source {spec!r}; use stdlib')
