"""Checkpoints: keep-last-N plus best, damaged steps skipped by name, restore modes, shapes, meshes, pretrained init."""
import glob
import json
import os
import shutil
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


def _flip_a_byte(path):
  """One bit changed in the middle of the file, its size kept: what a failing disk or memory does."""
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x10]))


# Every file of a step directory, by role (paths relative to it), and three ways to lose one.
STEP_FILES = {
    'step metadata': '_CHECKPOINT_METADATA', 'metrics': 'metrics/metrics', 'file sizes': checkpoint.FILE_SIZES,
    'state metadata': 'state/_METADATA', 'sharding': 'state/_sharding', 'array metadata': 'state/array_metadatas/*',
    'data json': 'data/metadata', 'config json': 'config/metadata', 'model metadata json': 'metadata/metadata',
    'digests json': 'digests/metadata', 'root manifest': 'state/manifest.ocdbt', 'root index': 'state/d/*',
    'process manifest': 'state/ocdbt.process_*/manifest.ocdbt', 'array data': 'state/ocdbt.process_*/d/*',
}
CUTS = {'emptied': lambda path: open(path, 'w').close(), 'cut in half': _truncate, 'deleted': os.remove}
DAMAGE = {f'{role} {cut}': (pattern, CUTS[cut]) for role, pattern in STEP_FILES.items() for cut in CUTS}
DAMAGE['state item deleted'] = ('state', shutil.rmtree)


@pytest.fixture(scope='module')
def saved_steps(tmp_path_factory):
  """checkpoints/ with steps 2 and 4 of small_tree, saved once per module; tests damage copies of it."""
  directory = str(tmp_path_factory.mktemp('saved') / 'checkpoints')
  save_steps(directory, [2, 4])
  return directory


def restore_newest_intact(directory, **kwargs):
  """(step, state, data, log lines) of restore_first_intact over every step in `directory`."""
  messages = []
  ckpt = checkpoint.Checkpointer(directory)  # opening reads every step's metrics: damage must not stop it
  restored = checkpoint.restore_first_intact(ckpt, ckpt.steps(), abstract_tree(), messages.append, **kwargs)
  ckpt.close()
  return (*restored, messages)


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_skipped(damage, saved_steps, tmp_path):
  pattern, cut = DAMAGE[damage]
  names = sorted(os.path.relpath(p, f'{saved_steps}/4') for p in glob.glob(f'{saved_steps}/4/{pattern}'))
  if not names and damage.startswith('sharding'):
    pytest.skip('this Orbax version writes no state/_sharding')
  assert names, f'no {pattern} in a saved step'
  for i, name in enumerate(names):  # each file alone
    directory = str(tmp_path / str(i) / 'checkpoints')
    shutil.copytree(saved_steps, directory)
    cut(os.path.join(directory, '4', name))
    step, state, data, messages = restore_newest_intact(directory)
    assert (step, data) == (2, {'step': 2}), name
    np.testing.assert_array_equal(state['w'], small_tree(2)['w'])
    assert len(messages) == 1 and messages[0].startswith(f'skipping checkpoint {directory}/4: '), messages
    assert (name + '/' if damage == 'state item deleted' else name) in messages[0], messages  # the file, named


def test_a_flipped_bit_in_array_data_is_caught_by_the_digests(saved_steps, tmp_path):
  directory = str(tmp_path / 'checkpoints')
  shutil.copytree(saved_steps, directory)
  _flip_a_byte(_biggest_array_file(f'{directory}/4'))
  # Orbax alone restores the changed values without a word (as it did before digests were recorded).
  step, state, _, messages = restore_newest_intact(directory, verify=False)
  assert step == 4 and not messages and not np.array_equal(state['w'], small_tree(4)['w'])
  step, state, _, messages = restore_newest_intact(directory)
  assert step == 2 and messages == [f'skipping checkpoint {directory}/4: DamagedCheckpoint: digest mismatch in w: its '
                                    'values are not those saved']
  np.testing.assert_array_equal(state['w'], small_tree(2)['w'])


def test_a_checkpoint_saved_before_digests_restores_unverified(saved_steps, tmp_path):
  directory = str(tmp_path / 'checkpoints')
  shutil.copytree(saved_steps, directory)
  for step in (2, 4):  # what earlier versions wrote: no digests item, no file sizes
    shutil.rmtree(f'{directory}/{step}/digests')
    os.remove(f'{directory}/{step}/{checkpoint.FILE_SIZES}')
  step, state, _, messages = restore_newest_intact(directory)
  assert step == 4 and messages == [f'checkpoint {directory}/4 has no array digests (saved before lmlab recorded '
                                    'them): restored unverified']
  np.testing.assert_array_equal(state['w'], small_tree(4)['w'])
  assert restore_newest_intact(directory, verify=False)[3] == []


@pytest.mark.parametrize('shape, dtype', [((4, 5), np.float32), ((6,), jnp.bfloat16), ((2, 3), np.int8),
                                          ((4,), np.uint32), ((), np.int32), ((2, 2), bool)])
def test_digests_match_the_formula_whatever_the_sharding_and_see_every_single_bit(shape, dtype):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal(shape) * 100).astype(dtype)
  words = x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint8 if x.dtype.itemsize == 1 else np.uint32)
  i = np.arange(words.size, dtype=np.uint64)
  w = words.reshape(-1).astype(np.uint64)
  expected = [int((w * (2 * i + 1)).sum() % 2**32), int((w * ((i * 0x9E3779B9 % 2**32) | 1)).sum() % 2**32)]
  on_one = checkpoint.array_digests({'x': jnp.asarray(x)})['x']
  assert on_one == [str(jnp.asarray(x).dtype), *expected]
  if x.ndim and x.shape[0] % 2 == 0:  # rows on two devices: the same digests
    two = jax.device_put(x, NamedSharding(jax.make_mesh((2,), ('x',), devices=jax.devices()[:2]), P('x')))
    assert checkpoint.array_digests({'x': two})['x'] == on_one
  for bit in range(1 if x.dtype == bool else words.itemsize * 8):  # every bit of the last element
    flipped = words.copy().reshape(-1)
    flipped[-1] ^= flipped.dtype.type(1 << bit)
    assert checkpoint.array_digests({'x': jnp.asarray(flipped.reshape(words.shape).view(x.dtype))})['x'] != on_one


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


@pytest.fixture(scope='module')
def trainer_steps(tmp_path_factory):
  """A run's workdir with fake (random) train states at steps 2 and 4, saved once per module."""
  workdir = tmp_path_factory.mktemp('trainer') / 'run'
  trainer = make_trainer(workdir)
  save_fake_steps(trainer, [2, 4])
  trainer.checkpointer.close()
  return workdir


def change_recorded_digest(step_dir, name):
  """The digest recorded for array `name`, one digit changed (the file keeps its size): the arrays now disagree."""
  path = os.path.join(step_dir, 'digests', 'metadata')
  with open(path) as f:
    digests = json.load(f)
  digest = str(digests[name][1])
  digests[name][1] = int(digest[:-1] + str((int(digest[-1]) + 1) % 10))
  with open(path, 'w') as f:
    json.dump(digests, f)


@pytest.mark.parametrize('damage', ['metrics emptied', 'arrays disagree with their digests'])
def test_a_run_restarts_from_the_previous_step_when_the_newest_is_damaged(damage, trainer_steps, tmp_path, capsys):
  """Through Trainer.restore_or_init, so Orbax's opening of the directory is covered too.

  (Where a flipped bit lands in a TrainState's data files depends on the order of Orbax's concurrent writes;
  test_a_flipped_bit_in_array_data_is_caught_by_the_digests flips one in data laid out the same every time.)
  """
  shutil.copytree(trainer_steps, tmp_path / 'run')
  step_dir = str(tmp_path / 'run' / 'checkpoints' / '4')
  if damage == 'metrics emptied':  # disk full: Orbax used to fail opening the directory on this file
    open(os.path.join(step_dir, 'metrics', 'metrics'), 'w').close()
    reason = 'DamagedCheckpoint: metrics/metrics has 0 bytes, 2 when saved'
  else:
    change_recorded_digest(step_dir, 'params/embed/embedding')
    reason = 'DamagedCheckpoint: digest mismatch in params/embed/embedding: its values are not those saved'
    shutil.copytree(tmp_path / 'run', tmp_path / 'unverified')
  assert int(restore(tmp_path / 'run').step) == 2
  out = capsys.readouterr().out
  assert f'skipping checkpoint {step_dir}: {reason}\n' in out and 'resumed from step 2' in out, out
  assert os.listdir(tmp_path / 'run' / 'checkpoints') == ['2']  # the damaged step is set aside, not deleted
  (aside,) = glob.glob(str(tmp_path / 'run' / 'checkpoints.set-aside-*'))
  assert os.listdir(aside) == ['4']
  if damage != 'metrics emptied':
    assert int(restore(tmp_path / 'unverified', verify_checkpoints=False).step) == 4
    assert 'skipping' not in capsys.readouterr().out


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
