"""Metric rows to metrics.jsonl and TensorBoard, and the plots a researcher looks at first."""
import json
import os
import sys

import numpy as np


def flatten(metrics: dict) -> dict:
  """Scalars stay; per-layer arrays (MoE) become `name/layerN` (vectors become lists)."""
  flat = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    if value.ndim == 0:
      flat[name] = value.item()
    elif value.ndim == 1:
      flat[name] = float(value.mean())
      flat.update({f'{name}/layer{i}': float(v) for i, v in enumerate(value)})
    else:
      flat.update({f'{name}/layer{i}': [float(x) for x in row.ravel()] for i, row in enumerate(value)})
  return flat


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without torch unless torch is already loaded.

  tensorboardX imports torch (1.3-1.9 s per process here) only to accept torch tensors, which lmlab never logs;
  a None in sys.modules makes that optional import fail fast, and removing it leaves torch importable afterwards.
  """
  if 'torch' in sys.modules or 'tensorboardX' in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricsWriter:
  """Appends JSON rows and TensorBoard scalars; only process 0 writes."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb_dir = os.path.join(workdir, 'tensorboard')
    self.tb = self._tensorboard() if enabled else None

  def _tensorboard(self, purge_step: int | None = None):
    return _summary_writer()(self.tb_dir, purge_step=purge_step)

  def truncate_after(self, step: int) -> int:
    """Forgets rows past `step` (a resumed run rewrites them) in metrics.jsonl and TensorBoard; returns how many.

    Lines cut short by a kill go too. TensorBoard readers drop events past `step` via purge_step.
    """
    if not self.enabled:
      return 0
    self.tb.close()
    self.tb = self._tensorboard(purge_step=step + 1)
    if not os.path.exists(self.path):
      return 0
    with open(self.path) as f:
      lines = f.read().splitlines()
    kept = [line for line, row_step in zip(lines, map(_row_step, lines)) if row_step is not None and row_step <= step]
    if len(kept) < len(lines):
      with open(self.path + '.tmp', 'w') as f:
        f.writelines(line + '\n' for line in kept)
      os.replace(self.path + '.tmp', self.path)
    return len(lines) - len(kept)

  def write(self, step: int, metrics: dict) -> dict:
    row = {'step': int(step), **flatten(metrics)}
    if self.enabled:
      with open(self.path, 'a') as f:
        f.write(json.dumps(row) + '\n')
      for name, value in row.items():
        if name != 'step' and isinstance(value, (int, float)):
          self.tb.add_scalar(name, value, step)
    return row

  def close(self):
    if self.tb is not None:
      self.tb.close()


def read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def expert_load(row: dict) -> np.ndarray | None:
  """The [MoE layer, expert] load matrix logged in a metrics row, or None for a dense model."""
  layers = sorted((int(k.rsplit('layer', 1)[1]), v) for k, v in row.items() if k.startswith('moe/load/layer'))
  return np.array([v for _, v in layers]) if layers else None


# Scores beside the loss, on plot_loss's second axis: GRPO's per-step sampled reward and its held-out exact match.
SCORE_LINES = {
    'grpo/reward_mean': {'label': 'sampled reward (mean)', 'color': 'tab:green', 'alpha': 0.5},
    'eval_exact_match': {'label': 'held-out exact match', 'color': 'tab:red', 'marker': 'o'},
}


def plot_loss(rows: list[dict], path: str, baseline: float | None = None) -> None:
  """Train and eval loss against step, with the unigram entropy of the validation tokens as the line to beat; GRPO
  runs add their sampled reward and held-out exact match on a second axis (their surrogate loss stays near 0)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  for key, label in (('loss', 'train'), ('eval_loss', 'validation')):
    points = [(r['step'], r[key]) for r in rows if key in r]
    if points:
      ax.plot(*zip(*points), label=label, marker='o' if key == 'eval_loss' else None)
  if baseline is not None:
    ax.axhline(baseline, color='gray', linestyle='--', label=f'unigram entropy ({baseline:.2f})')
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats / token)')
  ax.grid(alpha=0.3)
  handles, labels = ax.get_legend_handles_labels()
  series = {key: [(r['step'], r[key]) for r in rows if key in r] for key in SCORE_LINES}
  if any(series.values()):
    right = ax.twinx()
    for key, points in series.items():
      if points:
        right.plot(*zip(*points), **SCORE_LINES[key])
    right.set_ylabel('reward / exact match')
    more_handles, more_labels = right.get_legend_handles_labels()
    handles, labels = handles + more_handles, labels + more_labels
  ax.legend(handles, labels, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_expert_load(load_LE: np.ndarray, path: str) -> None:
  """Heatmap of the share of routed tokens per expert (columns) in each MoE layer (rows)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  load_LE = np.asarray(load_LE)
  fig, ax = plt.subplots(figsize=(max(4, 0.35 * load_LE.shape[1] + 2), max(2.5, 0.35 * load_LE.shape[0] + 1.5)))
  image = ax.imshow(load_LE, aspect='auto', cmap='viridis', vmin=0)
  ax.set_xlabel('expert')
  ax.set_ylabel('MoE layer')
  ax.set_title(f'expert load (uniform = {1 / load_LE.shape[1]:.3f})')
  fig.colorbar(image, ax=ax, label='share of routed tokens')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _row_step(line: str) -> int | None:
  """The step of a metrics.jsonl line; None for a line cut short by a kill."""
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return None
