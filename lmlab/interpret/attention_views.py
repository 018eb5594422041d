"""Attention pictures (per layer/head heatmap PNGs, attention rollout after Abnar & Zuidema 2020) and the bar chart
of per-token attribution scores.

Rollout with the residual correction: each layer's head-averaged attention A becomes 0.5 * A + 0.5 * I, rows are
renormalised, and the layers are multiplied from the first up; rows stay distributions and a causal model's
rollout stays lower-triangular.
"""
import os

import numpy as np


def rollout(weights_XHLL) -> np.ndarray:
  """[L, L] rollout of one example's attention ([layers, heads, L, L], real tokens only)."""
  weights_XHLL = np.asarray(weights_XHLL, np.float64)
  L = weights_XHLL.shape[-1]
  result_LL = np.eye(L)
  for attention_HLL in weights_XHLL:
    a_LL = 0.5 * attention_HLL.mean(0) + 0.5 * np.eye(L)
    a_LL /= a_LL.sum(-1, keepdims=True)
    result_LL = a_LL @ result_LL
  return result_LL


def _labels(tokens: list[str]) -> list[str]:
  return [t.replace('\n', '\\n').replace('$', r'\$') or ' ' for t in tokens]  # matplotlib: $ starts mathtext


def heatmap_png(matrix_YX, tokens: list[str], title: str, path: str, rows: list[str] | None = None,
                axes: tuple[str, str] = ('key', 'query')) -> str:
  """A heatmap with tokens along x (and y, unless `rows` labels the rows); returns `path`."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (plotting only where pictures are asked for)
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  matrix_YX = np.asarray(matrix_YX)
  rows = _labels(tokens) if rows is None else rows
  size = min(12, 2 + 0.3 * max(matrix_YX.shape))
  fig, ax = plt.subplots(figsize=(size + 1, min(12, 2 + 0.3 * matrix_YX.shape[0])))
  image = ax.imshow(matrix_YX, cmap='viridis', aspect='auto')
  ax.set_xticks(range(len(tokens)), _labels(tokens), rotation=90, fontsize=7)
  ax.set_yticks(range(len(rows)), rows, fontsize=7)
  ax.set_xlabel(axes[0])
  ax.set_ylabel(axes[1])
  ax.set_title(title)
  fig.colorbar(image, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def head_pngs(weights_XHLL, tokens: list[str], output_dir: str, prefix: str = '') -> list[str]:
  """One heatmap per layer and head: {prefix}attention_layer{i}_head{h}.png."""
  return [heatmap_png(weights_XHLL[i, h], tokens, f'layer {i} head {h}',
                      os.path.join(output_dir, f'{prefix}attention_layer{i}_head{h}.png'))
          for i in range(weights_XHLL.shape[0]) for h in range(weights_XHLL.shape[1])]


def token_scores_png(scores: dict, tokens: list[str], path: str) -> str:
  """One bar chart per method of its per-token scores, tokens along x; returns `path`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(len(scores), 1, figsize=(min(16, 2 + 0.4 * len(tokens)), 1.8 * len(scores)),
                           squeeze=False, sharex=True)
  for ax, (method, values) in zip(axes[:, 0], scores.items()):
    values = np.asarray(values)
    ax.bar(range(len(tokens)), values, color=np.where(values >= 0, 'tab:blue', 'tab:red'))
    ax.axhline(0.0, color='black', linewidth=0.5)
    ax.set_ylabel(method, fontsize=7)
  axes[-1, 0].set_xticks(range(len(tokens)), _labels(tokens), rotation=90, fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path
