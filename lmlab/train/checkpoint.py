"""Orbax checkpoints of the train state with the data-iterator state, config, model metadata and array digests.

Retention: the newest `keep` checkpoints plus the one with the lowest eval loss. A checkpoint records
its eval loss (as Orbax metrics) only when an evaluation ran at its step; the others rank as +inf.
Orbax writes each step to `N.orbax-checkpoint-tmp*` and renames it when complete, so a save killed
half-way never touches older steps; such leftovers are removed when the next run opens the directory.

Integrity: before that rename, a save records the size of every file of the step (`lmlab_files.json`) and,
in the same Composite save as the arrays, two digests of every array of the state (the `digests` item). A
restore checks the files first and the restored arrays after, so a file cut short, deleted or with a flipped
bit marks its step as damaged, naming the file or the array, and restore_first_intact falls back.
"""
import glob
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

ITEMS = ('state', 'data', 'config', 'metadata', 'digests')
FILE_SIZES = 'lmlab_files.json'
STEP_METADATA = '_CHECKPOINT_METADATA'
# Orbax rewrites the step metadata (commit time) and adds its commit marker after the sizes are taken.
UNSIZED = (STEP_METADATA, 'commit_success.txt')


class DamagedCheckpoint(Exception):
  """A file or an array of a checkpoint is not what was saved."""


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, except that an unreadable metrics file leaves its step unranked instead of failing the open.

  Orbax reads every step's metrics when it opens (for best_fn), before any fallback could run; the damaged
  step is then named and skipped by restore_first_intact like any other damage.
  """

  def _get_metrics(self, step: int):
    try:
      return super()._get_metrics(step)
    except ValueError:  # json.JSONDecodeError: an empty or cut-short metrics/metrics
      return None


def _eval_loss(metrics) -> float:
  return metrics.get('eval_loss', math.inf) if metrics else math.inf


class Checkpointer:
  """One CheckpointManager over `directory` (a run's `workdir/checkpoints`), with async saves."""

  def __init__(self, directory: str, keep: int = 3, writable: bool = True):
    if keep < 1:
      raise ValueError(f'keep_checkpoints={keep} must be at least 1; set checkpoint_every=0 to disable checkpoints')
    self.directory = os.path.abspath(directory)
    self._saving = None  # the step whose async save is in flight
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=_eval_loss, reverse=True, n=1)])
    # PyTree (not Standard) for the state: the same files, plus partial restores (weights without optimizer state).
    handlers = {'state': ocp.PyTreeCheckpointHandler(), **{k: ocp.JsonCheckpointHandler() for k in ITEMS[1:]}}
    # best_fn makes Orbax write and reload each step's metrics; the preservation policy decides what stays.
    options = ocp.CheckpointManagerOptions(
        create=writable, enable_async_checkpointing=True, cleanup_tmp_directories=writable, best_fn=_eval_loss,
        best_mode='min', preservation_policy=policy,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._record_sizes))
    self.manager = _Manager(self.directory, options=options, item_handlers=handlers)

  def save(self, step: int, state, data_state: dict, config: dict, metadata: dict, eval_loss: float | None = None,
           force: bool = False) -> bool:
    """Starts an async save of step `step`; `eval_loss` (from an evaluation at this step) ranks it for keep-best."""
    metrics = {} if eval_loss is None else {'eval_loss': float(eval_loss)}
    digests = array_digests(state)  # before the call: the state may be donated to the next step once it returns
    self.manager.wait_until_finished()  # Orbax waits for the previous save anyway; _saving must name one save
    self._saving = step
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config),
        metadata=ocp.args.JsonSave(metadata), digests=ocp.args.JsonSave(digests)), metrics=metrics, force=force)

  def _record_sizes(self) -> None:
    """Orbax's post-finalization hook: on the primary host, every item written, before the rename to the final name."""
    step_dir = (glob.glob(f'{self.path(self._saving)}.orbax-checkpoint-tmp*') or [self.path(self._saving)])[0]
    sizes = {}
    for root, _, files in os.walk(step_dir):
      for name in files:
        sizes[os.path.relpath(os.path.join(root, name), step_dir)] = os.path.getsize(os.path.join(root, name))
    with open(os.path.join(step_dir, FILE_SIZES), 'w') as f:
      json.dump({'sizes': {k: v for k, v in sorted(sizes.items()) if os.path.basename(k) not in UNSIZED}}, f)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the lowest eval loss (the newest one when no checkpoint has an eval loss)."""
    return self.manager.best_step()

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def set_aside(self, steps: list[int]) -> str:
    """Moves these step directories into a sibling `checkpoints.set-aside-TIME/` (kept, not deleted); returns it."""
    destination = f'{self.directory}.set-aside-{time.strftime("%Y%m%d-%H%M%S")}'
    if jax.process_index() == 0:
      os.makedirs(destination, exist_ok=True)
      for step in steps:
        os.rename(self.path(step), os.path.join(destination, str(step)))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('lmlab checkpoints set aside')
    self.manager.reload()
    return destination

  def check_files(self, step: int) -> None:
    """Raises DamagedCheckpoint naming the first file of `step` that is missing or not of its size at save time."""
    root = self.path(step)
    _read_json(root, STEP_METADATA)  # rewritten after the sizes are taken: it must at least parse
    if not os.path.exists(os.path.join(root, FILE_SIZES)):
      if self.has_digests(step):  # saved by this version, which always writes both
        raise DamagedCheckpoint(f'{FILE_SIZES} is missing')
      return  # saved before lmlab recorded sizes: Orbax's own errors are all there is
    for name, size in _read_json(root, FILE_SIZES)['sizes'].items():
      if not os.path.isfile(os.path.join(root, name)):
        raise DamagedCheckpoint(f'{name} is missing')
      if os.path.getsize(os.path.join(root, name)) != size:
        raise DamagedCheckpoint(f'{name} has {os.path.getsize(os.path.join(root, name))} bytes, {size} when saved')

  def has_digests(self, step: int) -> bool:
    return os.path.isdir(os.path.join(self.path(step), 'digests'))

  def state_metadata(self, step: int):
    """The saved train state's tree, with shape and dtype metadata at the leaves."""
    metadata = self.manager.item_metadata(step)['state']
    if metadata is None:
      raise FileNotFoundError(f'{self.path(step)}/state has no metadata')
    return metadata.tree

  def restore(self, step: int, target, verify: bool = True):
    """(state, data_state) at `step`, on the shardings of `target`'s leaves (host numpy arrays where it has none).

    Leaves of `target` set to ocp.PLACEHOLDER are not read. With `verify`, each restored array must match the
    digest recorded at save (checkpoints saved before digests existed are not checked).
    """
    items = {'state': ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
             'data': ocp.args.JsonRestore()}
    check = verify and self.has_digests(step)
    if check:
      items['digests'] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if check:
      compare_digests(restored['state'], restored['digests'])
    return restored['state'], restored['data']

  def item(self, step: int, name: str) -> dict:
    """One JSON item ('data', 'config' or 'metadata') of `step`."""
    return self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _read_json(root: str, name: str):
  """The JSON file root/name; a missing or unparsable one is damage, named."""
  try:
    with open(os.path.join(root, name)) as f:
      return json.load(f)
  except FileNotFoundError:
    raise DamagedCheckpoint(f'{name} is missing') from None
  except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
    raise DamagedCheckpoint(f'{name} is not valid JSON ({e})') from None


def only(*collections: str):
  """A restore target for restore_first_intact: these top-level parts of the saved state, as host arrays."""
  def target(saved):
    keep = lambda path, m: jax.ShapeDtypeStruct(m.shape, m.dtype) if path[0].key in collections else ocp.PLACEHOLDER
    return jax.tree_util.tree_map_with_path(keep, saved)
  return target


# ---- Array digests: sum_i w[i] * m(i) mod 2^32 over the array's bits as uint32 words w, for two odd index
# multipliers m. A single changed bit changes w[i] by +-2^b, hence the digest by 2^b * m(i) != 0 mod 2^32; integer
# addition wraps exactly in any order, so the value does not depend on the mesh, the sharding or the host count.

def _words(x):
  """The array's bits as uint32 words: narrower dtypes widened, 64-bit ones split (a trailing axis of 2)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = x.dtype.itemsize * 8
  if bits >= 32:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{bits}')).astype(jnp.uint32)


def _digest(x):
  """[2] uint32: the array's digests under m(i) = 2i + 1 and m(i) = (i * golden ratio) | 1, i the row-major index."""
  words = _words(x)
  strides = np.cumprod((words.shape + (1,))[:0:-1])[::-1] if words.ndim else []
  index = sum((jax.lax.broadcasted_iota(jnp.uint32, words.shape, d) * np.uint32(s % 2**32)
               for d, s in enumerate(strides)), jnp.zeros(words.shape, jnp.uint32))
  products = (words * (2 * index + 1), words * ((index * np.uint32(0x9E3779B9)) | 1))
  zero = np.uint32(0)  # one variadic reduction for both sums: half the compile time of two on XLA:CPU
  sums = jax.lax.reduce(products, (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), tuple(range(words.ndim)))
  return jnp.stack(sums)


_digests = jax.jit(lambda leaves: jnp.stack([_digest(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32))


def array_digests(tree) -> dict[str, list]:
  """'params/embed/embedding' -> [dtype, digest, digest] for every array of `tree`, computed where the arrays are."""
  leaves = [(jax.tree_util.keystr(p, simple=True, separator='/'), x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, 'dtype')]
  values = np.asarray(jax.device_get(_digests(tuple(x for _, x in leaves))))
  return {name: [str(x.dtype), int(a), int(b)] for (name, x), (a, b) in zip(leaves, values)}


def compare_digests(tree, recorded: dict) -> None:
  """Raises DamagedCheckpoint naming the first array of `tree` whose digests differ from `recorded`.

  An array restored to another dtype than it was saved in (a cast on restore) cannot be compared and is passed.
  """
  for name, (dtype, *digests) in array_digests(tree).items():
    if name not in recorded:
      raise DamagedCheckpoint(f'the digests item has no entry for {name}')
    if recorded[name][0] == dtype and recorded[name][1:] != digests:
      raise DamagedCheckpoint(f'digest mismatch in {name}: its values are not those saved')


def path_shapes(tree) -> dict[str, tuple]:
  """Leaf path ('params/layers/block_0/...') -> shape; dicts, dataclasses and tuples name their keys alike."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator='/'): tuple(leaf.shape) for path, leaf in leaves}


def first_mismatch(source: dict[str, tuple], target: dict[str, tuple]) -> str | None:
  """Names the first array of `target` that `source` lacks or holds in another shape, with both shapes."""
  for name, shape in target.items():
    if name not in source:
      return f'{name} (shape {shape} here) is missing there'
    if tuple(source[name]) != tuple(shape):
      return f'{name} is {tuple(source[name])} there but {tuple(shape)} here'
  extra = sorted(set(source) - set(target))
  return f'{extra[0]} (shape {tuple(source[extra[0]])} there) is not in this model' if extra else None


def _reason(error: BaseException) -> str:
  """The first line of the innermost exception: Orbax wraps tensorstore's precise message in a vague one."""
  while error.__cause__ or (error.__context__ and not error.__suppress_context__):
    error = error.__cause__ or error.__context__
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:300] if lines else repr(error)}'


def _everyone_ok(ok: bool) -> bool:
  """True when `ok` holds on every process, so all of them fall back to the same checkpoint."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def restore_first_intact(checkpointer: Checkpointer, steps: list[int], abstract_state, log, fall_back: bool = True,
                         verify: bool = True):
  """(step, state, data_state) from the newest of `steps` that restores intact; each skipped one is logged with why.

  `abstract_state` is the target tree, or a function of a step's saved state tree (see state_metadata) giving
  one, e.g. only('params', 'model_state'). A checkpoint whose shapes differ from a target tree is a config
  error, raised at once naming the first differing array. Without `fall_back`, a damaged checkpoint is an
  error too. `verify` checks the restored arrays against their digests.
  """
  skipped = []
  for step in sorted(steps, reverse=True):
    path = checkpointer.path(step)
    try:
      checkpointer.check_files(step)
      saved, error = checkpointer.state_metadata(step), None
    except Exception as e:  # pylint: disable=broad-except  (a file cut short, missing or unreadable: damage)
      saved, error = None, e
    if _everyone_ok(error is None):
      target = abstract_state(saved) if callable(abstract_state) else abstract_state
      mismatch = None if callable(abstract_state) else first_mismatch(path_shapes(saved), path_shapes(target))
      if mismatch:
        raise ValueError(f'checkpoint {path} does not fit this model: {mismatch}; run with the model config it was '
                         'saved with, or start elsewhere with --config.restore=none')
      try:
        restored, error = checkpointer.restore(step, target, verify), None
      except Exception as e:  # pylint: disable=broad-except  (unreadable data or a digest mismatch: damage)
        restored, error = None, e
      if _everyone_ok(error is None):
        if verify and not checkpointer.has_digests(step):
          log(f'checkpoint {path} has no array digests (saved before lmlab recorded them): restored unverified')
        return (step, *restored)
    reason = _reason(error) if error is not None else 'failed to restore on another process'
    if not fall_back:
      raise ValueError(f'checkpoint {path} cannot be restored ({reason}); pick another step (--config.restore=STEP, '
                       '--pretrained=WORKDIR@STEP)')
    log(f'skipping checkpoint {path}: {reason}')
    skipped.append(path)
  raise ValueError(f'none of the {len(skipped)} checkpoints in {checkpointer.directory} can be restored (reasons '
                   'above); move them away or pass --config.restore=none to start from scratch')


def restore_source(restore: str, own: Checkpointer, log) -> tuple[Checkpointer, list[int], bool]:
  """What --config.restore (other than none) points at: (checkpointer, candidate steps, whether damage falls back)."""
  if restore == 'latest':
    return own, own.steps(), True
  if restore.isdigit():
    if int(restore) not in own.steps():
      raise ValueError(f'--config.restore={restore}: there is no step {restore} in {own.directory}; available steps: '
                       f'{", ".join(map(str, own.steps())) or "none"}')
    return own, [int(restore)], False
  path = os.path.abspath(os.path.expanduser(restore))
  if not os.path.isdir(path):
    raise ValueError(f'--config.restore={restore} is not latest, none, a step number or an existing checkpoint '
                     'directory')
  if own.steps():
    log(f'--config.restore={restore} not used: this run has checkpoints of its own in {own.directory}')
    return own, own.steps(), True
  if os.path.isdir(os.path.join(path, 'checkpoints')):  # a workdir
    path = os.path.join(path, 'checkpoints')
  if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, 'state')):  # one step directory
    return Checkpointer(os.path.dirname(path), writable=False), [int(os.path.basename(path))], False
  other = Checkpointer(path, writable=False)
  if not other.steps():
    raise ValueError(f'--config.restore={restore}: no checkpoint steps in {path}')
  return other, other.steps(), True
