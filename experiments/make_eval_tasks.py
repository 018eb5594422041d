"""Writes the offline default evaluation tasks: python -m experiments.make_eval_tasks --out=DIR [--n=200 --seed=0]
-> DIR/docstring_mc.jsonl (mc:) and DIR/arithmetic_gen.jsonl (gen:), for experiments.evaluate --task=..."""
from absl import flags

from experiments import cli

_OUT = flags.DEFINE_string('out', None, 'Directory the task files go to.', required=True)
_N = flags.DEFINE_integer('n', 200, 'Rows per task (the docstring task has at most the ~260 held-out functions).')
_SEED = flags.DEFINE_integer('seed', 0, 'Which functions, distractors and expressions are drawn.')


def main(argv):
  del argv
  from lmlab.eval import offline_tasks  # pylint: disable=g-import-not-at-top
  if _N.value < 1:
    raise ValueError(f'--n={_N.value} must be at least 1')
  for spec, rows in offline_tasks.write_tasks(_OUT.value, _N.value, _SEED.value).items():
    print(f'{spec} ({rows} rows)')


if __name__ == '__main__':
  cli.run(main)
