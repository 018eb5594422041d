"""Sweeps: grid expansion and run ids, one-line errors, the three backends, results tables, skip and resume, and
the ablation recipes' claims. One real 2x2 sweep of the tiny decoder runs locally; the Ray cluster reruns it."""
import csv
import dataclasses
import glob
import importlib
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys

import pytest
import tiny

from experiments.configs.base import get_base_config
from lmlab.models import model_config_from_dict
from lmlab.sweep import backends, collect, grid, runner
from lmlab.train import flops

PRESET = os.path.join(tiny.ROOT, 'experiments/configs/dense_tiny.py')
# Data-only keys: the four runs share one compiled program (one compile for the whole module), yet see different
# batches, so their losses differ and a mix-up between runs would show.
SWEEP = 'data.shuffle_window=64,256 data.validation_fraction=0.05,0.1'
FIXED = {'model.d_model': 32, 'model.num_layers': 2, 'model.ffn_dim': 64, 'seq_len': 32, 'batch_size': 8,
         'steps': tiny.STEPS, 'log_every': 1, 'checkpoint_every': 12, 'eval_every': 12, 'eval_batches': 1,
         'progress': False}
COMPARED = ('status', 'steps', 'eval_loss', 'eval_accuracy', 'final_train_loss')


def sweep_spec() -> grid.Spec:
  return grid.checked(grid.Spec(PRESET, grid=grid.parse_sweep(SWEEP, get_base_config()), overrides=FIXED),
                      get_base_config())


def read_csv(root) -> dict:
  with open(os.path.join(root, 'results.csv')) as f:
    return {row['run_id']: row for row in csv.DictReader(f)}


def sweep_cli(root, env, *extra) -> subprocess.CompletedProcess:
  flags = [f'--config.{k}={grid.format_value(v)}' for k, v in FIXED.items()]
  return subprocess.run([sys.executable, '-m', 'experiments.sweep', f'--config={PRESET}', f'--workdir={root}',
                         f'--sweep={SWEEP}', '--parallel=2', *flags, *extra],
                        cwd=tiny.ROOT, env=env, capture_output=True, text=True, timeout=400, check=False)


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """Every run (local children, Ray workers) shares the session's compilation cache."""
  child = tiny.child_env(tmp_path_factory, devices=1)
  with pytest.MonkeyPatch.context() as patch:
    for name in ('PYTHONPATH', 'JAX_COMPILATION_CACHE_DIR', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'):
      patch.setenv(name, child[name])
    yield child


@pytest.fixture(scope='module')
def local_sweep(tmp_path_factory, env):
  """The 2x2 sweep through the command line and the local backend, two runs at a time."""
  root = str(tmp_path_factory.mktemp('local'))
  done = sweep_cli(root, env)
  assert done.returncode == 0, done.stderr[-3000:]
  return root


def test_expand_takes_the_product_of_lists_and_zip_groups_times_seeds():
  spec = grid.Spec('p.py', grid={'a': [1, 2], 'b': ['x', 'y', 'z']}, zip=[{'c': [10, 20], 'd': [0.1, 0.2]}], seeds=2)
  runs = grid.expand(spec)
  expected = [({'a': a, 'b': b, 'c': c, 'd': d}, s) for a in (1, 2) for b in 'xyz' for c, d in ((10, 0.1), (20, 0.2))
              for s in (0, 1)]
  assert [(r.overrides, r.seed) for r in runs] == expected
  assert len({r.run_id for r in runs}) == len(expected)


def test_run_ids_ignore_key_order_and_value_spelling_but_not_seed_or_fixed_keys():
  config = get_base_config()
  parsed = grid.parse_sweep('model.moe.capacity_factor=1,2 model.moe.top_k=1', config)
  from_spec = grid.checked(grid.Spec('p.py', grid={'model.moe.top_k': [1], 'model.moe.capacity_factor': [1.0, 2.0]}),
                           config)
  assert parsed == {'model.moe.capacity_factor': [1.0, 2.0], 'model.moe.top_k': [1]}
  ids = {r.run_id for r in grid.expand(grid.Spec('p.py', grid=parsed))}
  assert ids == {r.run_id for r in grid.expand(from_spec)}
  assert grid.run_id({}, {'a': 1}, 0, 'p.py') != grid.run_id({}, {'a': 1}, 1, 'p.py')
  assert grid.run_id({}, {'a': 1}, 0, 'p.py') != grid.run_id({'steps': 5}, {'a': 1}, 0, 'p.py')


@pytest.mark.parametrize('sweep, message', [
    ('model.moe.num_expert=0,8', "unknown config key 'model.moe.num_expert'"),
    ('model.moe.top_k=1,two', "model.moe.top_k: 'two' does not parse as int"),
    ('model.moe.renormalize=yes', 'model.moe.renormalize'),
    ('model.moe=1', 'is a section'),
    ('seed=0,1', 'seed is set by the sweep'),
    ('steps', 'is not KEY=V1,V2'),
])
def test_bad_sweeps_are_one_line_errors_naming_the_key(sweep, message):
  with pytest.raises(ValueError, match=message):
    grid.parse_sweep(sweep, get_base_config())


def test_bad_specs_are_refused():
  config = get_base_config()
  with pytest.raises(ValueError, match='different lengths'):
    grid.checked(grid.Spec('p.py', zip=[{'model.moe.top_k': [1, 2], 'model.moe.num_experts': [8]}]), config)
  with pytest.raises(ValueError, match='both swept and fixed'):
    grid.checked(grid.Spec('p.py', grid={'steps': [1, 2]}, overrides={'steps': 3}), config)
  with pytest.raises(ValueError, match="model.moe.top_k: 1.5 is a float"):
    grid.checked(grid.Spec('p.py', grid={'model.moe.top_k': [1.5]}), config)


def test_unknown_sweep_key_fails_before_any_run_starts(tmp_path, env):
  done = subprocess.run([sys.executable, '-m', 'experiments.sweep', f'--workdir={tmp_path}',
                         '--sweep=model.moe.top_k=1,2 model.moe.num_expert=0,8'],
                        cwd=tiny.ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      "error: unknown config key 'model.moe.num_expert' ('model.moe.num_expert' is not declared); "
      'see experiments/configs/base.py for the keys']
  assert not os.listdir(tmp_path)


def test_missing_engine_names_the_extra_to_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'ray', None)  # what an environment without ray looks like to `import ray`
  with pytest.raises(ValueError, match=r"needs ray, which is not installed; pip install 'lmlab\[sweep\]'"):
    backends.make_backend('ray', str(tmp_path), parallel=1)


def python_job(tmp_path, name, code) -> backends.Job:
  return backends.Job(name, (sys.executable, '-c', code), str(tmp_path / name), str(tmp_path))


def test_local_backend_keeps_going_after_a_crash_and_splits_devices(tmp_path):
  jobs = [python_job(tmp_path, 'crash', 'raise SystemExit(3)'),
          python_job(tmp_path, 'ok', "import os; print(os.environ['XLA_FLAGS'].split()[-1])")]
  assert backends.LocalBackend(parallel=1, devices_per_run=2).run(jobs) == {'crash': 3, 'ok': 0}
  with open(tmp_path / 'ok' / 'log.txt') as f:
    assert f.read().strip() == '--xla_force_host_platform_device_count=2'
  slots = backends.device_slots(parallel=2, devices_per_run=0, gpus=['0', '1', '2', '3'])
  assert slots == [{'CUDA_VISIBLE_DEVICES': '0,1'}, {'CUDA_VISIBLE_DEVICES': '2,3'}]
  with pytest.raises(ValueError, match='need 6, but 4 are visible'):
    backends.device_slots(parallel=2, devices_per_run=3, gpus=['0', '1', '2', '3'])


def test_slurm_backend_runs_a_job_array_through_submitits_local_executor(tmp_path):
  backend = backends.SlurmBackend(str(tmp_path / 'slurm'), cluster='local')
  jobs = [python_job(tmp_path, 'ok', "print('ran')"), python_job(tmp_path, 'crash', 'raise SystemExit(5)')]
  assert backend.run(jobs) == {'ok': 0, 'crash': 5}
  with open(tmp_path / 'ok' / 'log.txt') as f:
    assert f.read() == 'ran\n'


def test_slurm_sbatch_script_is_an_array_of_multi_node_srun_runs(tmp_path):
  script = backends.SlurmBackend(str(tmp_path), partition='gpu', gpus_per_run=16, nodes=2, timeout_min=90,
                                 parallel=4).sbatch_script(num_jobs=6)
  sbatch = {line.split('=')[0]: line.split('=', 1)[1] for line in script.splitlines()
            if line.startswith('#SBATCH') and '=' in line}
  assert sbatch['#SBATCH --array'] == '0-5%4'
  assert (sbatch['#SBATCH --nodes'], sbatch['#SBATCH --ntasks-per-node'], sbatch['#SBATCH --gpus-per-node']) == (
      '2', '1', '8')
  assert (sbatch['#SBATCH --partition'], sbatch['#SBATCH --time']) == ('gpu', '90')
  srun = [line for line in script.splitlines() if line.startswith('srun ')]
  assert len(srun) == 1 and srun[0].endswith(f'-m submitit.core._submit {tmp_path}')
  with pytest.raises(ValueError, match='does not split over --nodes=2'):
    backends.SlurmBackend(str(tmp_path), gpus_per_run=3, nodes=2)


def write_run(root, run_id, overrides, seed, summary=None, exit_status=0, log=''):
  workdir = os.path.join(root, 'runs', run_id)
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'run.json'), 'w') as f:
    json.dump({'overrides': overrides, 'seed': seed, 'exit_status': exit_status}, f)
  if summary:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump({'step': 10, 'wall_time_s': 1.0, **summary}, f)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      f.write(json.dumps({'step': 10, 'loss': 2.0, 'tokens_per_s': 100.0}) + '\n')
      f.write(json.dumps({'step': 10, 'eval_loss': summary['eval_loss']}) + '\n')
  with open(os.path.join(workdir, 'log.txt'), 'w') as f:
    f.write(log)


def test_results_group_seeds_with_mean_and_standard_error_and_list_failures(tmp_path):
  losses = {'a': [2.0, 2.5, 3.0], 'b': [1.0, 1.5]}
  ids = []
  for top_k, values in losses.items():
    for seed, loss in enumerate(values):
      ids.append(f'{top_k}{seed}')
      write_run(tmp_path, ids[-1], {'k': top_k}, seed, {'eval_loss': loss})
  ids.append('broken')
  write_run(tmp_path, 'broken', {'k': 'b'}, 2, exit_status=1, log='\n'.join(f'line {i}' for i in range(40)))
  with open(tmp_path / 'sweep.json', 'w') as f:
    json.dump({'config': 'p.py', 'keys': ['k'], 'runs': ids, 'trend': 'b is lower'}, f)
  rows = collect.collect(str(tmp_path))
  assert [r['status'] for r in rows] == ['finished'] * 5 + ['failed']
  markdown = (tmp_path / 'results.md').read_text()
  for top_k, values in losses.items():  # standard error of the mean: sample std / sqrt(n)
    se = statistics.stdev(values) / math.sqrt(len(values))
    assert f'| {top_k} | {len(values)} | {statistics.fmean(values):.4f} ± {se:.4f} |' in markdown
  assert 'Expected trend: b is lower' in markdown
  assert '`broken` (k=b, seed 2), exit status 1' in markdown
  assert 'line 39' in markdown and 'line 24' not in markdown  # the tail of the log, not all of it
  assert sorted(os.listdir(tmp_path / 'plots')) == ['eval_loss_curves.png', 'eval_loss_vs_k.png']


def test_a_zip_group_is_one_plot_axis(tmp_path):
  """Keys that move together are plotted as one axis of their rows, not each against the other as lines; plots of
  axes no longer swept are removed."""
  ids = []
  for k, router in ((1, 'switch'), (2, 'softmax'), (4, 'softmax')):
    for seed in (0, 1):
      ids.append(f'{k}{seed}')
      write_run(tmp_path, ids[-1], {'k': k, 'router': router}, seed, {'eval_loss': 2.0 / k + seed})
  with open(tmp_path / 'sweep.json', 'w') as f:
    json.dump({'config': 'p.py', 'keys': ['k', 'router'], 'zip': [{'k': [1, 2, 4], 'router': ['switch', 'softmax',
              'softmax']}], 'runs': ids, 'trend': ''}, f)
  os.makedirs(tmp_path / 'plots')
  (tmp_path / 'plots' / 'eval_loss_vs_k.png').write_bytes(b'')  # left by an earlier spec that swept k alone
  collect.collect(str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'plots')) == ['eval_loss_curves.png', 'eval_loss_vs_k+router.png']


def test_local_sweep_collects_every_run(local_sweep):
  spec = sweep_spec()
  rows = read_csv(local_sweep)
  assert set(rows) == {run.run_id for run in grid.expand(spec)}
  for run in grid.expand(spec):
    row = rows[run.run_id]
    with open(os.path.join(local_sweep, 'runs', run.run_id, 'summary.json')) as f:
      summary = json.load(f)
    assert row['status'] == 'finished' and int(row['steps']) == tiny.STEPS
    assert float(row['eval_loss']) == summary['eval_loss'] and float(row['wall_time_s']) == summary['wall_time_s']
    assert int(row['data.shuffle_window']) == run.overrides['data.shuffle_window'] and row['seed'] == '0'
    assert float(row['tokens_per_s']) > 0
  assert len({row['eval_loss'] for row in rows.values()}) == 4  # every run trained on its own data
  markdown = open(os.path.join(local_sweep, 'results.md')).read()
  assert '4 of 4 runs finished' in markdown
  assert sorted(os.listdir(os.path.join(local_sweep, 'plots'))) == [
      'eval_loss_curves.png', 'eval_loss_vs_data.shuffle_window.png', 'eval_loss_vs_data.validation_fraction.png']


def test_dry_run_prints_the_exact_commands(local_sweep, env, tmp_path):
  done = sweep_cli(str(tmp_path), env, '--dry_run')
  assert done.returncode == 0, done.stderr
  lines = done.stdout.strip().splitlines()
  runs = grid.expand(sweep_spec())
  assert lines == [shlex.join(grid.command(sweep_spec(), run, os.path.join(tmp_path, 'runs', run.run_id)))
                   for run in runs]
  assert not os.listdir(tmp_path)
  with open(os.path.join(local_sweep, 'runs', runs[0].run_id, 'run.json')) as f:
    assert json.load(f)['command'] == grid.command(sweep_spec(), runs[0], os.path.join(local_sweep, 'runs',
                                                                                       runs[0].run_id))


def test_rerun_skips_finished_runs_and_resumes_a_killed_one(local_sweep, env):
  killed = grid.expand(sweep_spec())[1].run_id
  workdir = os.path.join(local_sweep, 'runs', killed)
  before = read_csv(local_sweep)
  # What a kill between the checkpoints at steps 12 and 24 leaves: no summary, a checkpoint at 12 only.
  os.remove(os.path.join(workdir, 'summary.json'))
  shutil.rmtree(glob.glob(os.path.join(workdir, 'checkpoints', '24*'))[0])
  logs = {path: os.path.getsize(path) for path in glob.glob(os.path.join(local_sweep, 'runs', '*', 'log.txt'))}
  done = sweep_cli(local_sweep, env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'sweep: 4 runs, 3 already finished, running 1' in done.stdout
  grown = [path for path, size in logs.items() if os.path.getsize(path) != size]
  assert grown == [os.path.join(workdir, 'log.txt')]
  with open(grown[0]) as f:
    assert 'resumed from step 12' in f.read()[logs[grown[0]]:]
  after = read_csv(local_sweep)
  assert {k: after[killed][k] for k in COMPARED} == {k: before[killed][k] for k in COMPARED}


@pytest.fixture(scope='module')
def ray_cluster(env):
  ray = pytest.importorskip('ray')
  ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
  yield ray
  ray.shutdown()


def test_ray_backend_reproduces_the_local_results(local_sweep, ray_cluster, tmp_path):
  del ray_cluster  # the backend joins the running cluster
  root = str(tmp_path / 'ray')
  runner.run_sweep(sweep_spec(), root, backends.RayBackend(parallel=2))
  local, ray = read_csv(local_sweep), read_csv(root)
  assert set(ray) == set(local)
  for run_id, row in ray.items():
    assert {k: row[k] for k in COMPARED} == {k: local[run_id][k] for k in COMPARED}


def test_every_ablation_recipe_is_a_valid_sweep():
  paths = sorted(glob.glob(os.path.join(tiny.ROOT, 'experiments/ablations/[a-z]*.py')))
  assert [os.path.basename(p) for p in paths] == ['capacity_factor.py', 'dense_vs_moe.py', 'num_experts.py',
                                                  'router_z_loss.py', 'shared_expert.py', 'top_k.py']
  for path in paths:
    spec = grid.load_spec(path)
    grid.checked(spec, get_base_config())
    assert spec.trend and len(grid.expand(spec)) == spec.seeds * math.prod(
        [len(v) for v in spec.grid.values()] + [len(next(iter(g.values()))) for g in spec.zip])


def active_params_of(recipe: str) -> list[float]:
  """Active matmul parameters per token of each setting of a recipe, from lmlab's FLOPs model, router excluded."""
  spec = grid.load_spec(os.path.join(tiny.ROOT, recipe))
  preset = importlib.import_module(spec.config.removesuffix('.py').replace('/', '.'))
  counts = []
  for run in grid.expand(dataclasses.replace(spec, seeds=1)):
    config = tiny.override(preset.get_config(), **spec.overrides, **run.overrides)
    model = model_config_from_dict(config.model.to_dict())
    router = model.d_model * model.moe.num_experts * model.num_layers
    counts.append(flops.active_matmul_params(model) - router)
  return counts


@pytest.mark.parametrize('recipe', ['experiments/ablations/num_experts.py', 'experiments/ablations/dense_vs_moe.py',
                                    'experiments/ablations/shared_expert.py'])
def test_recipes_that_claim_equal_active_compute_have_it(recipe):
  counts = active_params_of(recipe)
  assert len(counts) > 1 and len(set(counts)) == 1, counts
