"""Documents -> tokens -> packed rows -> shuffled windows -> this host's slice of each global batch.

Packing: each document is tokenized lazily, followed by EOS, and the token stream is cut into rows of
L+1 tokens with stride L (row k is stream[kL : kL+L+1]), so inputs=row[:-1], targets=row[1:] and no
next-token pair is lost at a row edge. Segment ids number the document pieces of a row 1, 2, ...;
positions restart at 0 per piece; a pair whose target lies in another document (or is padding) has
weight 0, so the loss never crosses documents.

Shuffling: document order is a seeded permutation per epoch, and rows are permuted inside windows of
`data.shuffle_window` rows. The state is the packer position at the start of the current window plus
how many of its rows were taken, so a restore replays at most one window and is exact by
construction. Every host packs the same global stream and keeps its own rows of each batch: hosts
then agree on batches without communicating, at the price of tokenizing the whole stream on each.

Mixtures draw each next document's source with seeded uniforms (one per draw, so the state is a count);
with repeat=False an exhausted source drops out and the rest are renormalised. A background thread
keeps `data.prefetch` batches ready; the state reported is that of the batches consumed, not prefetched.
"""
import json
import queue
import threading

import jax
import numpy as np

from lmlab.data import sources as sources_lib
from lmlab.sharding import batch_sharding

STATE_VERSION = 1


class _DocStream:
  """One source's documents, in a fresh seeded order each epoch; the state is (epoch, index)."""

  def __init__(self, source, seed: list[int], shuffle: bool, repeat: bool):
    if not len(source):
      raise ValueError(f'data source {source.name} has no documents; check data.source and the split names')
    self.source, self.seed, self.shuffle, self.repeat = source, seed, shuffle, repeat
    self.epoch, self.index = 0, 0
    self._order_epoch, self._order = None, None

  def get_state(self) -> dict:
    return {'epoch': self.epoch, 'index': self.index}

  def set_state(self, state: dict) -> None:
    self.epoch, self.index = state['epoch'], state['index']

  def _order_for(self, epoch: int) -> np.ndarray:
    if self._order_epoch != epoch:
      n = len(self.source)
      self._order = np.random.default_rng([*self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
      self._order_epoch = epoch
    return self._order

  def exhausted(self) -> bool:
    return not self.repeat and self.index == len(self.source)

  def next(self) -> str | None:
    """The next document's text, or None once the stream is exhausted (repeat=False)."""
    if self.exhausted():
      return None
    if self.index == len(self.source):
      self.epoch, self.index = self.epoch + 1, 0
    doc = self.source[int(self._order_for(self.epoch)[self.index])]
    self.index += 1
    return doc


class _Mixture:
  """Documents from weighted streams, the source of draw n picked by the n-th seeded uniform."""
  block = 4096  # Uniforms generated per rng call.

  def __init__(self, streams: list[_DocStream], weights: list[float], seed: int):
    self.streams, self.weights, self.seed = streams, np.asarray(weights, np.float64), seed
    self.drawn = 0
    self._block_index, self._uniforms = None, None

  def get_state(self) -> dict:
    return {'drawn': self.drawn, 'streams': [s.get_state() for s in self.streams]}

  def set_state(self, state: dict) -> None:
    if len(state['streams']) != len(self.streams):
      raise ValueError(f'data state has {len(state["streams"])} sources but the config has {len(self.streams)}; '
                       'resume with the data.source / data.mixture the checkpoint was written with')
    self.drawn = state['drawn']
    for stream, stream_state in zip(self.streams, state['streams']):
      stream.set_state(stream_state)

  def _uniform(self, n: int) -> float:
    if self._block_index != n // self.block:
      self._block_index = n // self.block
      self._uniforms = np.random.default_rng([self.seed, 2, self._block_index]).random(self.block)
    return self._uniforms[n % self.block]

  def next(self) -> str | None:
    if len(self.streams) == 1:
      return self.streams[0].next()
    active = np.array([not s.exhausted() for s in self.streams])
    if not active.any():
      return None
    cumulative = np.cumsum(self.weights * active)
    k = int(np.searchsorted(cumulative, self._uniform(self.drawn) * cumulative[-1], side='right'))
    self.drawn += 1
    return self.streams[min(k, int(np.flatnonzero(active)[-1]))].next()


class _Packer:
  """Cuts EOS-terminated documents into rows of L+1 tokens; state is (doc cursor, token offset)."""

  def __init__(self, docs: _Mixture, tokenizer, seq_len: int):
    self.docs, self.tokenizer, self.seq_len = docs, tokenizer, seq_len
    self._doc_state = docs.get_state()  # Stream state that yields the current document again.
    self._tokens = None                 # Current document's tokens, EOS included.
    self._offset = 0                    # Position in _tokens of the next row's first token.

  def get_state(self) -> dict:
    return {'docs': self._doc_state, 'offset': self._offset}

  def set_state(self, state: dict) -> None:
    self.docs.set_state(state['docs'])
    self._doc_state, self._tokens, self._offset = state['docs'], None, state['offset']

  def _next_doc(self):
    """Tokens of the next non-empty document with EOS appended, with the stream state before it."""
    while True:
      before = self.docs.get_state()
      text = self.docs.next()
      if text is None:
        return None, before
      if text:
        ids = np.asarray(self.tokenizer.encode(text), np.int32)
        return np.append(ids, np.int32(self.tokenizer.eos_id)), before

  def next_row(self):
    """(tokens [L+1], piece ids [L+1]: 1.. per document piece, 0 padding) or None at the end."""
    if self._tokens is None:
      self.docs.set_state(self._doc_state)
      self._tokens, self._doc_state = self._next_doc()
      if self._tokens is None:
        return None
    n = self.seq_len + 1
    row_T = np.full(n, self.tokenizer.pad_id, np.int32)
    piece_T = np.zeros(n, np.int32)
    filled, piece = 0, 0
    while True:
      take = min(n - filled, len(self._tokens) - self._offset)
      piece += 1
      row_T[filled:filled + take] = self._tokens[self._offset:self._offset + take]
      piece_T[filled:filled + take] = piece
      filled += take
      if filled == n:
        # The row's last token (a target only) is the first input of the next row.
        self._offset += take - 1
        return row_T, piece_T
      tokens, before = self._next_doc()
      if tokens is None:
        self._doc_state, self._tokens, self._offset = before, np.zeros(0, np.int32), 0
        return (row_T, piece_T) if filled > 1 else None
      self._doc_state, self._tokens, self._offset = before, tokens, 0


def row_features(row_T: np.ndarray, piece_T: np.ndarray) -> dict[str, np.ndarray]:
  """Model features of one packed row of L+1 tokens (see the module docstring)."""
  segment_L = piece_T[:-1]
  starts_L = np.r_[True, segment_L[1:] != segment_L[:-1]]
  index_L = np.arange(len(segment_L))
  positions_L = index_L - np.maximum.accumulate(np.where(starts_L, index_L, 0))
  weights_L = (segment_L == piece_T[1:]) & (piece_T[1:] != 0)
  return {'inputs': row_T[:-1], 'targets': row_T[1:], 'segment_ids': segment_L,
          'positions': np.where(segment_L > 0, positions_L, 0).astype(np.int32),
          'weights': weights_L.astype(np.float32)}


class _Rows:
  """Packed rows, permuted inside windows of `window` rows; the state replays at most one window."""

  def __init__(self, packer: _Packer, window: int, seed: int, shuffle: bool):
    self.packer, self.window_size, self.seed, self.shuffle = packer, window, seed, shuffle
    self.window, self.taken = 0, 0
    self._start = packer.get_state()  # Packer state where the current window begins.
    self._rows = None

  def get_state(self) -> dict:
    return {'window_start': self._start, 'window': self.window, 'taken': self.taken}

  def set_state(self, state: dict) -> None:
    self._start, self.window, self.taken = state['window_start'], state['window'], state['taken']
    self._rows = None

  def _fill(self) -> None:
    self.packer.set_state(self._start)
    rows = []
    while len(rows) < self.window_size and (row := self.packer.next_row()) is not None:
      rows.append(row)
    if self.shuffle:
      rows = [rows[i] for i in np.random.default_rng([self.seed, 1, self.window]).permutation(len(rows))]
    self._rows = rows

  def next(self):
    if self._rows is None:
      self._fill()
    if self.taken == len(self._rows):
      if len(self._rows) < self.window_size:
        return None  # The stream ended inside this window.
      self._start, self.window, self.taken = self.packer.get_state(), self.window + 1, 0
      self._fill()
      if not self._rows:
        return None
    self.taken += 1
    return self._rows[self.taken - 1]


class _Batcher:
  """Global batches from rows, cut to this host's slice, each with the state right after it."""

  def __init__(self, rows: _Rows, sources: list, global_batch_size: int, seq_len: int, process_index: int,
               process_count: int):
    self.rows, self.sources, self.seq_len = rows, sources, seq_len
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.first = process_index * self.local_batch_size

  def state(self) -> dict:
    return json.loads(json.dumps({'version': STATE_VERSION, 'rows': self.rows.get_state()}))

  def next(self) -> tuple[dict[str, np.ndarray], dict]:
    rows = []
    while len(rows) < self.global_batch_size and (row := self.rows.next()) is not None:
      rows.append(row)
    if not rows:
      raise StopIteration
    empty = (np.zeros(self.seq_len + 1, np.int32), np.zeros(self.seq_len + 1, np.int32))
    rows += [empty] * (self.global_batch_size - len(rows))  # Last batch of a finite stream: weights 0.
    features = [row_features(*row) for row in rows[self.first:self.first + self.local_batch_size]]
    return {k: np.stack([f[k] for f in features]) for k in features[0]}, self.state()


def _prefetch_loop(produce, results: queue.Queue, stop: threading.Event) -> None:
  """Fills `results` with ('ok', value) or one final ('error', exception) until stopped."""
  while not stop.is_set():
    try:
      item = ('ok', produce())
    except BaseException as error:  # pylint: disable=broad-except  (re-raised in the consumer)
      item = ('error', error)
    while not stop.is_set():
      try:
        results.put(item, timeout=0.1)
        break
      except queue.Full:
        pass
    if item[0] == 'error':
      return


class BatchIterator:
  """This host's rows of each global batch, as numpy features; get_state/set_state resume exactly."""

  def __init__(self, batcher: _Batcher, prefetch: int):
    self._results = self._stop = self._thread = None
    self._batcher, self._prefetch, self._final_error = batcher, prefetch, None
    self._state = batcher.state()  # After the last batch handed out, not the last one prefetched.

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._final_error is not None:
      raise self._final_error
    if not self._prefetch:
      batch, self._state = self._batcher.next()
      return batch
    if self._thread is None:
      self._results, self._stop = queue.Queue(self._prefetch), threading.Event()
      self._thread = threading.Thread(target=_prefetch_loop, args=(self._batcher.next, self._results, self._stop),
                                      daemon=True, name='lmlab-data-prefetch')
      self._thread.start()
    kind, value = self._results.get()
    if kind == 'error':
      self._final_error = value
      raise value
    batch, self._state = value
    return batch

  def get_state(self) -> dict:
    return json.loads(json.dumps(self._state))

  def set_state(self, state: dict) -> None:
    if state.get('version') != STATE_VERSION:
      raise ValueError(f'data iterator state version {state.get("version")} is not {STATE_VERSION}; '
                       'this checkpoint was written by another lmlab data pipeline, start a fresh data stream')
    self.close()
    self._batcher.rows.set_state(state['rows'])
    self._state, self._final_error = self._batcher.state(), None

  @property
  def skipped_records(self) -> int:
    """Bad records skipped so far under data.on_bad_record=skip (counted as read, prefetch included)."""
    return sum(getattr(source, 'skipped', 0) for source in self._batcher.sources)

  def close(self) -> None:
    """Stops the prefetch thread (waiting for it, so nothing else touches the pipeline afterwards)."""
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._results = self._stop = self._thread = None

  def __del__(self):
    if self._stop is not None:
      self._stop.set()


def make_batches(data_config, tokenizer, *, split: str, global_batch_size: int, seq_len: int, seed: int,
                 shuffle: bool = True, repeat: bool = True,
                 process_index: int | None = None, process_count: int | None = None) -> BatchIterator:
  """Batches of one split of `data_config`'s source(s); each host gets its own rows of every batch."""
  specs, weights = zip(*sources_lib.parse_mixture(data_config))
  sources = [sources_lib.make_source(spec, data_config, split) for spec in specs]
  return batches_from_sources(sources, weights, tokenizer, global_batch_size=global_batch_size, seq_len=seq_len,
                              seed=seed, shuffle=shuffle, repeat=repeat, shuffle_window=data_config.shuffle_window,
                              prefetch=data_config.prefetch, process_index=process_index,
                              process_count=process_count)


def batches_from_sources(sources: list, weights: list[float], tokenizer, *, global_batch_size: int, seq_len: int,
                         seed: int, shuffle: bool, repeat: bool, shuffle_window: int, prefetch: int = 0,
                         process_index: int | None = None, process_count: int | None = None) -> BatchIterator:
  """make_batches for already built sources (each `len` + `[i] -> str` with a `name`), mixed by weight."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f'global batch size {global_batch_size} is not divisible by the {process_count} processes; '
                     f'use a multiple of {process_count}')
  streams = [_DocStream(source, [seed, 0, k], shuffle, repeat) for k, source in enumerate(sources)]
  rows = _Rows(_Packer(_Mixture(streams, weights, seed), tokenizer, seq_len), shuffle_window, seed, shuffle)
  return BatchIterator(_Batcher(rows, sources, global_batch_size, seq_len, process_index, process_count), prefetch)


def corpus_fingerprint(data_config) -> dict:
  """Identity of the corpus behind `data_config` (file count, bytes, content hash) for run metadata."""
  pairs = sources_lib.parse_mixture(data_config)
  if len(pairs) == 1:
    return sources_lib.fingerprint(pairs[0][0], data_config)
  return {'mixture': [{**sources_lib.fingerprint(spec, data_config), 'weight': w} for spec, w in pairs]}


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """This host's rows -> global arrays sharded over the mesh's data-parallel axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
