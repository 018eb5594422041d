"""Train a model from a config: python -m experiments.train --config=experiments/configs/dense_tiny.py --workdir=DIR."""
import os
import sys

from absl import flags

from experiments import cli

_CONFIG = cli.define_config_flag('experiments/configs/dense_tiny.py')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Where metrics, plots, checkpoints and the summary go.')
_JOIN_PROCESSES = cli.define_distributed_flags()


def main(argv):
  del argv
  from lmlab.train import loop  # pylint: disable=g-import-not-at-top  (jax starts after flags parse)
  _JOIN_PROCESSES()
  try:
    summary = loop.run(_CONFIG.value, _WORKDIR.value)
  except FloatingPointError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(1)
  except loop.Preempted as preempted:  # a clean stop: the same command resumes
    loop.log(str(preempted))
    sys.exit(0)
  outputs = [name for name in ('summary.json', 'metrics.jsonl', 'loss.png', 'expert_load.png', 'tensorboard',
                                'checkpoints') if os.path.exists(os.path.join(summary['workdir'], name))]
  loop.log(f'done: step {summary["step"]}, eval loss {summary.get("eval_loss", float("nan")):.4f} nats/token '
           f'(unigram entropy {summary["unigram_entropy"]:.4f}), '
           f'bits/byte {summary.get("eval_bits_per_byte", float("nan")):.4f}; '
           f'results in {summary["workdir"]}: {", ".join(outputs)}')


if __name__ == '__main__':
  cli.run(main)
