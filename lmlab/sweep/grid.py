"""A sweep as plain data: the grid (products and zip groups) expanded into runs, each named by a hash of its config.

Values are typed from the config's own defaults, so `--sweep` is checked against experiments/configs/base.py before
anything runs, and a run id never depends on how a value was spelled or in which order keys were given.
"""
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import sys

SEED_KEY = 'seed'  # set per run by the sweep: seeds 0 .. N-1


@dataclasses.dataclass
class Spec:
  """What to sweep: a preset, a grid (product of the value lists), zip groups (values that move together), seeds."""
  config: str                                              # preset file, e.g. experiments/configs/moe_tiny.py
  grid: dict = dataclasses.field(default_factory=dict)     # key -> list of values; the runs take their product
  zip: list = dataclasses.field(default_factory=list)      # [{key: values}]: one group's lists move together
  seeds: int = 1
  overrides: dict = dataclasses.field(default_factory=dict)  # key -> value applied to every run
  trend: str = ''                                          # what the ablation should show (recipes)


@dataclasses.dataclass(frozen=True)
class Run:
  run_id: str
  overrides: dict   # the swept keys' values, in the spec's order
  seed: int


def config_value(config, key: str):
  """The value at a dotted key of a ConfigDict; a one-line error naming the key when it does not exist."""
  node = config
  for i, name in enumerate(key.split('.')):
    if not hasattr(node, 'keys') or name not in node:
      raise ValueError(f'unknown config key {key!r} ({".".join(key.split(".")[:i + 1])!r} is not declared); '
                       'see experiments/configs/base.py for the keys')
    node = node[name]
  if hasattr(node, 'keys'):
    raise ValueError(f'config key {key!r} is a section, not a value; sweep one of its keys ({", ".join(node)})')
  return node


def parse_value(key: str, text: str, default):
  """One value typed like the config default at `key` (bool, int, float, str)."""
  text = text.strip()
  try:
    if isinstance(default, bool):
      lowered = text.lower()
      if lowered not in ('true', 'false', '1', '0'):
        raise ValueError
      return lowered in ('true', '1')
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
    if isinstance(default, str):
      return text
  except ValueError:
    raise ValueError(f'{key}: {text!r} does not parse as {type(default).__name__} (the type of its default '
                     f'{default!r}); fix the value list of {key}') from None
  raise ValueError(f'{key} holds a {type(default).__name__} ({default!r}), which a sweep cannot set from text; '
                   'set it in a spec file (--spec) instead')


def check_values(config, key: str, values) -> list:
  """A key and its value list (from a spec file or parsed flags) checked against the config; ints become floats
  where the default is a float, so 1 and 1.0 name the same run."""
  if key == SEED_KEY:
    raise ValueError('seed is set by the sweep itself (--seeds=N runs seeds 0 .. N-1); remove it from the grid')
  default = config_value(config, key)
  if not isinstance(values, (list, tuple)) or not values:
    raise ValueError(f'{key}: needs a non-empty list of values, got {values!r}')
  for value in values:
    if type(value) is not type(default) and not (isinstance(default, float) and type(value) is int):
      raise ValueError(f'{key}: {value!r} is a {type(value).__name__}, but its default {default!r} is a '
                       f'{type(default).__name__}; fix the value list of {key}')
  return [float(v) for v in values] if isinstance(default, float) else list(values)


def parse_sweep(text: str, config) -> dict:
  """`'a.b=1,2 c=x,y'` -> {'a.b': [1, 2], 'c': ['x', 'y']}, each key checked and each value typed by `config`."""
  grid = {}
  for item in text.split():
    key, sep, values = item.partition('=')
    if not sep or not values:
      raise ValueError(f'--sweep item {item!r} is not KEY=V1,V2,...; write e.g. model.moe.top_k=1,2')
    if key in grid:
      raise ValueError(f'{key} appears twice in the sweep; give its values once')
    default = config_value(config, key)
    grid[key] = check_values(config, key, [parse_value(key, v, default) for v in values.split(',')])
  return grid


def checked(spec: Spec, config) -> Spec:
  """The spec with every key declared, values typed like their defaults, zip groups of equal length, no key twice."""
  seen = set()

  def group_checked(group: dict) -> dict:
    for key in group:
      if key in seen:
        raise ValueError(f'{key} is swept twice (grid and zip groups must not share keys)')
      seen.add(key)
    return {key: check_values(config, key, values) for key, values in group.items()}

  grid, groups = group_checked(spec.grid), [group_checked(group) for group in spec.zip]
  for group in groups:
    lengths = {key: len(values) for key, values in group.items()}
    if len(set(lengths.values())) > 1:
      raise ValueError(f'zip group {lengths} has lists of different lengths; a zip group moves its values together, '
                       'so give every key in it the same number of values')
  overrides = {key: check_values(config, key, [value])[0] for key, value in spec.overrides.items()}
  both = seen & set(overrides)
  if both:
    raise ValueError(f'{", ".join(sorted(both))} both swept and fixed; drop one of the two')
  if spec.seeds < 1:
    raise ValueError(f'seeds={spec.seeds}: run at least one seed')
  return dataclasses.replace(spec, grid=grid, zip=groups, overrides=overrides)


def run_id(fixed: dict, overrides: dict, seed: int, config: str) -> str:
  """A short hash of everything that makes a run what it is: order of keys does not matter."""
  key = json.dumps({'config': os.path.normpath(config), 'overrides': {**fixed, **overrides}, SEED_KEY: seed},
                   sort_keys=True)
  return hashlib.sha256(key.encode()).hexdigest()[:12]


def expand(spec: Spec) -> list[Run]:
  """The product of the grid's lists and the zip groups (each one factor), times the seeds."""
  factors = [[{key: value} for value in values] for key, values in spec.grid.items()]
  factors += [[dict(zip(group, row)) for row in zip(*group.values())] for group in spec.zip]
  runs = []
  for combination in itertools.product(*factors):
    overrides = {key: value for part in combination for key, value in part.items()}
    runs += [Run(run_id(spec.overrides, overrides, seed, spec.config), overrides, seed) for seed in range(spec.seeds)]
  return runs


def format_value(value) -> str:
  """A value as `--config.key=` text that ml_collections parses back to the same value."""
  return repr(value) if isinstance(value, float) else str(value)


def command(spec: Spec, run: Run, workdir: str, entry: str = 'experiments.train') -> list[str]:
  """The exact command line of one run."""
  settings = {**spec.overrides, **run.overrides, SEED_KEY: run.seed}
  return [sys.executable, '-m', entry, f'--config={spec.config}', f'--workdir={workdir}',
          *(f'--config.{key}={format_value(value)}' for key, value in settings.items())]


def load_spec(path: str) -> Spec:
  """A Python sweep file (experiments/ablations/NAME.py) defining `get_spec() -> Spec`."""
  if not os.path.isfile(path):
    raise ValueError(f'--spec={path}: no such file; see experiments/ablations/ for recipes')
  module_spec = importlib.util.spec_from_file_location(f'sweep_spec_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_spec'):
    raise ValueError(f'--spec={path} defines no get_spec(); it must return an lmlab.sweep.grid.Spec')
  return module.get_spec()
