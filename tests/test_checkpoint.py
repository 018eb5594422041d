"""Checkpoints: keep-last-N plus best, damaged steps skipped by name, restore modes, shapes, meshes, pretrained init."""
import glob
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import tiny
from lmlab import convert, distributed
from lmlab.train import build, checkpoint, loop

# A damaged checkpoint makes Orbax abandon tensorstore reads mid-flight; their coroutines are never awaited.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


tiny_config = tiny.dense_config


def small_tree(seed: int):
  """Random values: constants compress to a few bytes, leaving no array file to damage."""
  sharding = NamedSharding(jax.make_mesh((1,), ('x',), devices=jax.devices()[:1]), P())
  rng = np.random.default_rng(seed)
  return {'w': jax.device_put(rng.standard_normal((128, 128), np.float32), sharding),
          'b': jax.device_put(rng.standard_normal(3, np.float32), sharding)}


def save_steps(directory, steps, eval_losses=None, keep=3):
  ckpt = checkpoint.Checkpointer(directory, keep)
  for step in steps:
    ckpt.save(step, small_tree(step), {'step': step}, {}, {}, eval_loss=(eval_losses or {}).get(step))
  ckpt.close()


def random_state(parts, step: int = 0, seed: int = 0):
  """A TrainState of random values on `parts`' shardings, without compiling the model's init."""
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda a: jax.device_put(rng.standard_normal(a.shape).astype(a.dtype), a.sharding),
                       parts.abstract_state())
  return state.replace(step=jax.device_put(np.int32(step), state.step.sharding))


def abstract_tree():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), small_tree(0))


def test_keeps_the_newest_n_plus_the_best_eval_loss_across_restarts(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  save_steps(directory, [1, 2, 3, 4, 5], eval_losses={2: 1.0, 4: 2.0}, keep=2)
  assert checkpoint.Checkpointer(directory, 2).steps() == [2, 4, 5]
  save_steps(directory, [6], keep=2)  # a new process: the best is known from the checkpoint's own metrics
  ckpt = checkpoint.Checkpointer(directory, 2)
  assert ckpt.steps() == [2, 5, 6] and ckpt.best_step() == 2


def _biggest_array_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_*', 'd', '*')), key=os.path.getsize)


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


DAMAGE = {
    'array file deleted': lambda d: os.remove(_biggest_array_file(d)),
    'array file truncated': lambda d: _truncate(_biggest_array_file(d)),
    'state metadata truncated': lambda d: _truncate(os.path.join(d, 'state', '_METADATA')),
    'state item deleted': lambda d: __import__('shutil').rmtree(os.path.join(d, 'state')),
    'data json cut': lambda d: _truncate(os.path.join(d, 'data', 'metadata')),
}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_skipped(damage, tmp_path):
  directory = str(tmp_path / 'checkpoints')
  save_steps(directory, [2, 4])
  DAMAGE[damage](os.path.join(directory, '4'))
  messages = []
  step, state, data = checkpoint.restore_first_intact(checkpoint.Checkpointer(directory), [2, 4], abstract_tree(),
                                                      messages.append)
  assert (step, data) == (2, {'step': 2})
  np.testing.assert_array_equal(state['w'], small_tree(2)['w'])
  assert len(messages) == 1 and messages[0].startswith(f'skipping checkpoint {directory}/4: '), messages


def test_all_checkpoints_damaged_is_an_error_not_a_fresh_start(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  save_steps(directory, [2, 4])
  for step in (2, 4):
    os.remove(_biggest_array_file(os.path.join(directory, str(step))))
  messages = []
  with pytest.raises(ValueError, match='none of the 2 checkpoints .* can be restored.*--config.restore=none'):
    checkpoint.restore_first_intact(checkpoint.Checkpointer(directory), [2, 4], abstract_tree(), messages.append)
  assert len(messages) == 2


def test_a_save_killed_half_way_is_ignored_and_cleaned_up(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  save_steps(directory, [2])
  # What a process killed inside an async save leaves: Orbax only renames to `6` once every file is written.
  partial = os.path.join(directory, '6.orbax-checkpoint-tmp-1700000000000000')
  os.makedirs(os.path.join(partial, 'state'))
  open(os.path.join(partial, 'state', '_METADATA'), 'w').write('{"tree_metad')
  ckpt = checkpoint.Checkpointer(directory)
  assert ckpt.steps() == [2]
  ckpt.save(4, small_tree(4), {}, {}, {})  # the next save waits for the clean-up begun on opening
  ckpt.close()
  assert sorted(os.listdir(directory)) == ['2', '4']


def test_a_checkpoint_of_another_shape_names_the_first_differing_parameter(tmp_path):
  parts = build.build(tiny_config(), devices=jax.devices()[:1])
  save = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  save.save(0, random_state(parts), {}, {}, {})
  save.close()
  other = build.build(tiny_config(**{'model.ffn_dim': 48}), devices=jax.devices()[:1])
  expected = r'params/layers/block_0/mlp/down/kernel is \(2, 64, 32\) there but \(2, 48, 32\) here'
  with pytest.raises(ValueError, match=r'checkpoint .*/0 does not fit this model: ' + expected):
    checkpoint.restore_first_intact(checkpoint.Checkpointer(str(tmp_path / 'checkpoints')), [0],
                                    other.abstract_state(), print)


def test_a_checkpoint_from_one_device_restores_onto_eight(tmp_path):
  state = random_state(build.build(tiny_config(), devices=jax.devices()[:1]))
  save = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  save.save(0, state, {}, {}, {})
  save.close()
  eight = build.build(tiny_config(**{'mesh.fsdp': 4, 'mesh.tensor': 2}))
  _, restored, _ = checkpoint.restore_first_intact(checkpoint.Checkpointer(str(tmp_path / 'checkpoints')), [0],
                                                   eight.abstract_state(), print)
  kernel = restored.params['layers']['block_0']['attn']['query']['kernel']
  assert len(kernel.sharding.device_set) == 8 and kernel.sharding.spec == eight.shardings.params['layers'][
      'block_0']['attn']['query']['kernel'].spec
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), jax.device_get(state.params))


def make_trainer(workdir, **overrides):
  # fsdp=8: Orbax restores replicated arrays through one compiled slice per array and device; sharded ones need none.
  config = tiny_config(**{'eval_every': 0, 'checkpoint_every': 2, 'mesh.fsdp': 8, **overrides})
  return loop.Trainer(config, str(workdir))


def save_fake_steps(trainer, steps):
  """Checkpoints at `steps` without training."""
  for step in steps:
    trainer.save(random_state(trainer.parts, step), trainer.batches('train', shuffle=True))
  trainer.checkpointer.wait()


def restore(workdir, **overrides):
  trainer = make_trainer(workdir, **overrides)
  with trainer.parts.context():
    state = trainer.restore_or_init(trainer.batches('train', shuffle=True))
  trainer.checkpointer.close()
  return state


def test_restore_latest_step_none_and_missing_step(tmp_path, capsys):
  save_fake_steps(make_trainer(tmp_path), [2, 4, 6])
  with pytest.raises(ValueError, match=r'--config.restore=5: there is no step 5 in .*; available steps: 2, 4, 6'):
    restore(tmp_path, restore='5')
  assert int(restore(tmp_path).step) == 6
  assert f'resumed from step 6 ({tmp_path}/checkpoints/6)' in capsys.readouterr().out
  assert int(restore(tmp_path, restore='2').step) == 2  # a roll-back: the newer steps leave this run's history
  out = capsys.readouterr().out
  assert 'checkpoints [4, 6] (newer than step 2) moved to' in out and 'resumed from step 2' in out
  assert int(restore(tmp_path, restore='none').step) == 0
  out = capsys.readouterr().out
  assert 'starting from scratch (--config.restore=none; checkpoints [2] moved to' in out
  assert os.listdir(tmp_path / 'checkpoints') == []
  assert sorted(step for d in glob.glob(str(tmp_path / 'checkpoints.set-aside-*')) for step in os.listdir(d)) == [
      '2', '4', '6']


def test_restore_from_another_runs_checkpoint_path(tmp_path, capsys):
  save_fake_steps(make_trainer(tmp_path / 'a'), [2, 4])
  assert int(restore(tmp_path / 'b', restore=str(tmp_path / 'a' / 'checkpoints' / '2')).step) == 2
  assert int(restore(tmp_path / 'c', restore=str(tmp_path / 'a')).step) == 4
  assert f'resumed from step 4 ({tmp_path}/a/checkpoints/4)' in capsys.readouterr().out
  with pytest.raises(ValueError, match='is not latest, none, a step number or an existing checkpoint directory'):
    restore(tmp_path / 'd', restore=str(tmp_path / 'nowhere'))


def test_init_from_pretrained_weights(tmp_path, capsys):
  parts = build.build(tiny_config(), devices=jax.devices()[:1])
  params = jax.device_get(random_state(parts).params)  # not what a fresh init would give
  convert.save_orbax(str(tmp_path / 'pretrained'), parts.model_config, params)
  state = restore(tmp_path / 'run', init_from=str(tmp_path / 'pretrained'), **{'mesh.fsdp': 2, 'mesh.tensor': 2})
  assert 'starting from scratch with pretrained weights from' in capsys.readouterr().out
  assert int(state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), params)
  assert all(float(jnp.abs(m).max()) == 0 for m in jax.tree.leaves(state.opt_state[1][0].mu))
  with pytest.raises(ValueError, match=r'--config.init_from=.* does not fit this model: embed/embedding is '
                                       r'\(384, 32\) there but \(384, 48\) here'):
    restore(tmp_path / 'other', init_from=str(tmp_path / 'pretrained'), **{'model.d_model': 48})


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_asks_to_stop_once_then_acts_as_before(signum):
  before = signal.getsignal(signum)
  with distributed.PreemptionWatch() as watch:
    assert not watch.stop_at(1)
    os.kill(os.getpid(), signum)
    assert watch.stop_at(2) and watch.signal_name == signal.Signals(signum).name
    assert signal.getsignal(signum) is before  # a second Ctrl-C interrupts at once
  assert signal.getsignal(signum) is before
