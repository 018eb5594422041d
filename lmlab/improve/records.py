"""Atomic JSON and JSONL files: every stage output is written to a temporary file and renamed into place, so a
killed run leaves either the whole file or none, and a stage whose output exists is done."""
import json
import os
import tempfile


def write_json(path: str, value) -> None:
  _write(path, json.dumps(value, indent=2, sort_keys=True) + '\n')


def write_jsonl(path: str, rows: list[dict]) -> None:
  _write(path, ''.join(json.dumps(r, ensure_ascii=False, sort_keys=True) + '\n' for r in rows))


def append_jsonl(path: str, row: dict) -> None:
  """One row appended with a single O_APPEND write: concurrent writers never interleave inside a line."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  data = (json.dumps(row, ensure_ascii=False, sort_keys=True) + '\n').encode('utf-8')
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, data)
  finally:
    os.close(fd)


def read_json(path: str):
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def _write(path: str, text: str) -> None:
  directory = os.path.dirname(path) or '.'
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
