"""Orbax checkpoints of the train state with the data-iterator state, config and model metadata."""
import os

import orbax.checkpoint as ocp


class Checkpointer:
  """One CheckpointManager under `workdir/checkpoints`, async saves, newest `keep` kept."""

  def __init__(self, workdir: str, keep: int = 3):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                             enable_async_checkpointing=True))

  def save(self, step: int, state, data_state: dict, config: dict, metadata: dict, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config), metadata=ocp.args.JsonSave(metadata)), force=force)

  def latest_step(self):
    return self.manager.latest_step()

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
