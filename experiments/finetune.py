"""Fine-tune a pretrained model: python -m experiments.finetune --config=experiments/configs/minilm_classify.py
[--config.init_from=PATH] --workdir=DIR. Several processes and preemption work as in experiments.train.
"""
import sys

from absl import flags

from experiments import cli

_CONFIG = cli.define_config_flag('experiments/configs/minilm_classify.py')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/finetune', 'Where metrics, checkpoints, the export and summary go.')
_JOIN_PROCESSES = cli.define_distributed_flags()


def main(argv):
  del argv
  from lmlab.finetune import trainer  # pylint: disable=g-import-not-at-top  (jax starts after flags parse)
  from lmlab.train import loop  # pylint: disable=g-import-not-at-top
  _JOIN_PROCESSES()
  try:
    summary = trainer.run(_CONFIG.value, _WORKDIR.value)
  except FloatingPointError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(1)
  except loop.Preempted as preempted:  # a clean stop: the same command resumes (and exports at the end)
    loop.log(str(preempted))
    sys.exit(0)
  if 'eval_macro_f1' in summary:
    loop.log(f'done: step {summary["step"]}, eval accuracy {summary["eval_accuracy"]:.3f} (majority class '
             f'{summary["majority_class"]}: {summary["majority_accuracy"]:.3f}), '
             f'macro-F1 {summary["eval_macro_f1"]:.3f}')
  else:
    loop.log(f'done: step {summary["step"]}, eval loss {summary.get("eval_loss", float("nan")):.4f} '
             'nats/response token')
  loop.log(f'results in {summary["workdir"]} (summary.json, metrics.jsonl, checkpoints/'
           f'{", export/" if "export" in summary else ""})')


if __name__ == '__main__':
  cli.run(main)
