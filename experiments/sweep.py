"""Run a grid of experiments and tabulate them: python -m experiments.sweep --config=PRESET --workdir=ROOT
--sweep="model.moe.num_experts=0,8 model.moe.top_k=1,2" --seeds=3 [--spec=experiments/ablations/NAME.py]
[--backend=local|ray|slurm] [--parallel=N] [--dry_run] [--config.KEY=VALUE (every run)].
"""
import sys

from absl import flags

from experiments import cli

_DEFAULT_PRESET = 'experiments/configs/moe_tiny.py'


def _spec_preset(argv: list[str]) -> str | None:
  """With --spec and no --config, the spec's preset is the one to load (None when it cannot be read here;
  main() reports why)."""
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--spec=')), None)
  if spec is None:
    return None
  from lmlab.sweep import grid  # pylint: disable=g-import-not-at-top
  try:
    return grid.load_spec(spec).config
  except (ValueError, OSError, SyntaxError):
    return None


_CONFIG = cli.define_config_flag(_spec_preset(sys.argv) or _DEFAULT_PRESET)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/sweep', 'Sweep root: runs/<run id>/, results.csv, results.md, plots/.')
_SWEEP = flags.DEFINE_string('sweep', '', 'Space-separated KEY=V1,V2,...; the runs take the product of the lists.')
_ZIP = flags.DEFINE_multi_string('zip', [], 'A group of KEY=V1,V2 lists that move together (repeat for more groups).')
_SEEDS = flags.DEFINE_integer('seeds', None, 'Seeds per setting (0 .. N-1); default: the spec\'s, else 1.')
_SPEC = flags.DEFINE_string('spec', '', 'A Python sweep file with get_spec() (experiments/ablations/*.py).')
_BACKEND = flags.DEFINE_enum('backend', 'local', ['local', 'ray', 'slurm'], 'Where the runs execute.')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Runs at a time (local pool size, Ray CPUs, Slurm array limit).')
_DEVICES = flags.DEFINE_integer('devices_per_run', 0, 'local/ray: devices per run (0: GPUs split evenly; CPU: 1).')
_GPUS = flags.DEFINE_integer('gpus_per_run', 0, 'ray/slurm: GPUs each run asks for.')
_RAY_ADDRESS = flags.DEFINE_string('ray_address', '', 'ray: cluster to join; empty starts a local one.')
_PARTITION = flags.DEFINE_string('slurm_partition', '', 'slurm: partition for the job array.')
_NODES = flags.DEFINE_integer('nodes', 1, 'slurm: nodes per run (one process per node, joined by jax.distributed).')
_TIMEOUT = flags.DEFINE_integer('timeout_min', 60, 'slurm: time limit per run, minutes.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the exact commands (and the sbatch script) and run nothing.')


def fixed_overrides(argv: list[str], config) -> dict:
  """The --config.KEY flags given for every run, with the values the config parsed them to."""
  from lmlab.sweep import grid  # pylint: disable=g-import-not-at-top
  keys = [a[len('--config.'):].split('=', 1)[0] for a in argv if a.startswith('--config.')]
  return {key: grid.config_value(config, key) for key in keys}


def main(argv):
  del argv
  from lmlab.sweep import backends, grid, runner  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  spec = grid.load_spec(_SPEC.value) if _SPEC.value else grid.Spec(config=cli.config_name())
  fixed = fixed_overrides(sys.argv[1:], config)
  if grid.SEED_KEY in fixed:
    raise ValueError('--config.seed is set per run by the sweep (--seeds=N runs seeds 0 .. N-1); drop it')
  spec = grid.checked(grid.Spec(
      config=cli.config_name(), grid={**spec.grid, **grid.parse_sweep(_SWEEP.value, config)},
      zip=[*spec.zip, *(grid.parse_sweep(group, config) for group in _ZIP.value)],
      seeds=spec.seeds if _SEEDS.value is None else _SEEDS.value, overrides={**spec.overrides, **fixed},
      trend=spec.trend), config)
  entry = 'experiments.finetune' if config.finetune.task else 'experiments.train'
  backend = None  # a dry run starts no Ray cluster; for Slurm it shows the sbatch script too
  if not _DRY_RUN.value or _BACKEND.value == 'slurm':
    backend = backends.make_backend(_BACKEND.value, _WORKDIR.value, _PARALLEL.value, _DEVICES.value, _GPUS.value,
                                    _RAY_ADDRESS.value, _PARTITION.value, _NODES.value, _TIMEOUT.value)
  if _DRY_RUN.value and backend is not None:
    print(backend.sbatch_script(len(grid.expand(spec))))
  runner.run_sweep(spec, _WORKDIR.value, backend, entry, dry_run=_DRY_RUN.value)


if __name__ == '__main__':
  cli.run(main)
