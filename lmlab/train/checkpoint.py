"""Orbax checkpoints of the train state with the data-iterator state, config and model metadata.

Retention: the newest `keep` checkpoints plus the one with the lowest eval loss. A checkpoint records
its eval loss (as Orbax metrics) only when an evaluation ran at its step; the others rank as +inf.
Orbax writes each step to `N.orbax-checkpoint-tmp-*` and renames it when complete, so a save killed
half-way never touches older steps; such leftovers are removed when the next run opens the directory.
"""
import math
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

ITEMS = ('state', 'data', 'config', 'metadata')


def _eval_loss(metrics) -> float:
  return metrics.get('eval_loss', math.inf) if metrics else math.inf


class Checkpointer:
  """One CheckpointManager over `directory` (a run's `workdir/checkpoints`), with async saves."""

  def __init__(self, directory: str, keep: int = 3, writable: bool = True):
    if keep < 1:
      raise ValueError(f'keep_checkpoints={keep} must be at least 1; set checkpoint_every=0 to disable checkpoints')
    self.directory = os.path.abspath(directory)
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=_eval_loss, reverse=True, n=1)])
    handlers = {'state': ocp.StandardCheckpointHandler(), **{k: ocp.JsonCheckpointHandler() for k in ITEMS[1:]}}
    # best_fn makes Orbax write and reload each step's metrics; the preservation policy decides what stays.
    options = ocp.CheckpointManagerOptions(create=writable, enable_async_checkpointing=True,
                                           cleanup_tmp_directories=writable, best_fn=_eval_loss, best_mode='min',
                                           preservation_policy=policy)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def save(self, step: int, state, data_state: dict, config: dict, metadata: dict, eval_loss: float | None = None,
           force: bool = False) -> bool:
    """Starts an async save of step `step`; `eval_loss` (from an evaluation at this step) ranks it for keep-best."""
    metrics = {} if eval_loss is None else {'eval_loss': float(eval_loss)}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config), metadata=ocp.args.JsonSave(metadata)), metrics=metrics, force=force)

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

  def state_shapes(self, step: int) -> dict[str, tuple]:
    """'params/embed/embedding' -> shape, for every array of the saved train state (read from its metadata)."""
    metadata = self.manager.item_metadata(step)['state']
    if metadata is None:
      raise FileNotFoundError(f'{self.path(step)}/state has no metadata')
    return path_shapes(metadata)

  def restore(self, step: int, abstract_state):
    """(state, data_state) at `step`, placed on the shardings carried by `abstract_state`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


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
  while error.__cause__ or error.__context__:
    error = error.__cause__ or error.__context__
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:300] if lines else repr(error)}'


def _everyone_ok(ok: bool) -> bool:
  """True when `ok` holds on every process, so all of them fall back to the same checkpoint."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def restore_first_intact(checkpointer: Checkpointer, steps: list[int], abstract_state, log, fall_back: bool = True):
  """(step, state, data_state) from the newest of `steps` that restores; each skipped one is logged with why.

  A checkpoint whose shapes differ from `abstract_state` is a config error, raised at once naming the
  first differing array. Without `fall_back`, a damaged checkpoint is an error too.
  """
  skipped = []
  for step in sorted(steps, reverse=True):
    path = checkpointer.path(step)
    try:
      shapes, error = checkpointer.state_shapes(step), None
    except Exception as e:  # pylint: disable=broad-except  (unreadable metadata: a damaged checkpoint)
      shapes, error = None, e
    if _everyone_ok(error is None):
      mismatch = first_mismatch(shapes, path_shapes(abstract_state))
      if mismatch:
        raise ValueError(f'checkpoint {path} does not fit this model: {mismatch}; run with the model config it was '
                         'saved with, or start elsewhere with --config.restore=none')
      try:
        restored, error = checkpointer.restore(step, abstract_state), None
      except Exception as e:  # pylint: disable=broad-except  (missing or truncated files: a damaged checkpoint)
        restored, error = None, e
      if _everyone_ok(error is None):
        return (step, *restored)
    reason = _reason(error) if error is not None else 'failed to restore on another process'
    if not fall_back:
      raise ValueError(f'checkpoint {path} cannot be restored ({reason}); pick another step with --config.restore')
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
