"""The self-improvement loop: python -m experiments.improve --config=experiments/configs/improve_arith.py --workdir=DIR.

Rerun the same command after a kill (or SIGTERM, which stops cleanly) and it continues where it stopped.
"""
from absl import flags

from experiments import cli

_CONFIG = cli.define_config_flag('experiments/configs/improve_arith.py')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/improve', 'Where tasks, iterations/, lineage.json and progress.png go.')


def main(argv):
  del argv
  from lmlab.improve import loop  # pylint: disable=g-import-not-at-top  (jax starts after flags parse)
  from lmlab.train import loop as train_loop  # pylint: disable=g-import-not-at-top
  try:
    result = loop.run(_CONFIG.value, _WORKDIR.value)
  except train_loop.Preempted as preempted:  # saved; the same command resumes
    train_loop.log(str(preempted))
    return
  except loop.Paused as paused:
    print(f'paused: {paused}')
    return
  print(f'base held-out accuracy {result["base"]["heldout"]:.3f}')
  for d in result['decisions']:
    print(f'iteration {d["iteration"]}: held-out {d["candidate_heldout"]:.3f} (current {d["current_heldout"]:.3f}, '
          f'gain {d["heldout"]["difference"]:+.3f}, 95% CI [{d["heldout"]["ci_low"]:+.3f}, '
          f'{d["heldout"]["ci_high"]:+.3f}]) {"accepted" if d["accepted"] else "rejected: " + "; ".join(d["reasons"])}')
  print(f'current model: {result["current"]}; lineage.json and progress.png in {_WORKDIR.value}')


if __name__ == '__main__':
  cli.run(main)
