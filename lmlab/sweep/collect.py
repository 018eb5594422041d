"""A sweep's results from its runs' files: results.csv (one row per run), results.md (mean ± standard error over
seeds, failed runs with their log's tail) and plots/ (metric vs each swept key; eval-loss curves per group)."""
import csv
import json
import math
import os
import statistics

from lmlab.train import metrics as metrics_lib

SUMMARY_METRICS = ('eval_loss', 'eval_perplexity', 'eval_bits_per_byte', 'eval_accuracy', 'final_train_loss')
LAST_ROW_METRICS = ('moe/dropped_fraction', 'moe/z_loss', 'moe/aux_loss')  # MoE runs: from the last train row
TABLE_METRICS = ('eval_loss', 'eval_bits_per_byte', 'moe/dropped_fraction', 'moe/z_loss', 'moe/aux_loss',
                 'tokens_per_s', 'wall_time_s')
LOG_TAIL_LINES = 15


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_dir(root: str, run_id: str) -> str:
  return os.path.join(root, 'runs', run_id)


def log_tail(workdir: str, lines: int = LOG_TAIL_LINES) -> str:
  path = os.path.join(workdir, 'log.txt')
  if not os.path.exists(path):
    return '(no log.txt)'
  with open(path, errors='replace') as f:
    return '\n'.join(f.read().rstrip().splitlines()[-lines:])


def run_row(root: str, run_id: str) -> dict:
  """One run as a flat row: its swept values, seed, status (finished | failed | pending), steps and metrics."""
  workdir = run_dir(root, run_id)
  info = _read_json(os.path.join(workdir, 'run.json')) or {}
  summary = _read_json(os.path.join(workdir, 'summary.json'))
  rows = metrics_lib.read_rows(os.path.join(workdir, 'metrics.jsonl'))
  train_rows = [r for r in rows if 'loss' in r]
  status = 'finished' if summary else 'failed' if info.get('exit_status') not in (None, 0) else 'pending'
  row = {'run_id': run_id, **info.get('overrides', {}), 'seed': info.get('seed'), 'status': status,
         'exit_status': info.get('exit_status'),
         'steps': summary['step'] if summary else (rows[-1]['step'] if rows else 0)}
  row.update({name: (summary or {}).get(name) for name in SUMMARY_METRICS})
  row.update({name: train_rows[-1].get(name) if train_rows else None for name in LAST_ROW_METRICS})
  speeds = [r['tokens_per_s'] for r in train_rows if 'tokens_per_s' in r]
  row['tokens_per_s'] = statistics.median(speeds) if speeds else None  # median: the first steps include compiling
  row['wall_time_s'] = (summary or {}).get('wall_time_s')
  return row


def read_sweep(root: str) -> tuple[dict, list[dict]]:
  """ROOT/sweep.json (the spec as run) and one row per run, in the sweep's order."""
  meta = _read_json(os.path.join(root, 'sweep.json'))
  if meta is None:
    raise ValueError(f'{root} holds no sweep.json; point --workdir at the root of a sweep')
  return meta, [run_row(root, run_id) for run_id in meta['runs']]


def mean_and_stderr(values: list) -> tuple[float, float]:
  """Mean and standard error of the mean (sample std / sqrt n); the error is nan for a single value."""
  values = [v for v in values if v is not None]
  if not values:
    return math.nan, math.nan
  if len(values) == 1:
    return float(values[0]), math.nan
  return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def groups(rows: list[dict], keys: list[str]) -> dict:
  """Finished rows grouped by their swept values (seeds pooled), in first-seen order."""
  grouped = {}
  for row in rows:
    grouped.setdefault(tuple(row.get(k) for k in keys), []).append(row)
  return grouped


def _format(mean: float, stderr: float) -> str:
  if math.isnan(mean):
    return '–'
  digits = 1 if abs(mean) >= 100 else 4
  return f'{mean:.{digits}f}' + ('' if math.isnan(stderr) else f' ± {stderr:.{digits}f}')


def write_csv(rows: list[dict], path: str) -> None:
  columns = list(dict.fromkeys(name for row in rows for name in row))
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)


def write_markdown(meta: dict, rows: list[dict], root: str, path: str) -> None:
  keys = meta['keys']
  finished = [r for r in rows if r['status'] == 'finished']
  metrics = [m for m in TABLE_METRICS if any(r.get(m) is not None for r in finished)]
  lines = [f'# Sweep of {meta["config"]}', '']
  if meta.get('trend'):
    lines += [f'Expected trend: {meta["trend"]}', '']
  lines += [f'{len(finished)} of {len(rows)} runs finished; mean ± standard error over seeds.', '',
            '| ' + ' | '.join([*keys, 'seeds', *metrics]) + ' |', '|' + '---|' * (len(keys) + 1 + len(metrics))]
  for values, members in groups(finished, keys).items():
    cells = [_format(*mean_and_stderr([m.get(metric) for m in members])) for metric in metrics]
    lines.append('| ' + ' | '.join([*map(str, values), str(len(members)), *cells]) + ' |')
  for status in ('failed', 'pending'):
    others = [r for r in rows if r['status'] == status]
    if others:
      lines += ['', f'## {status.capitalize()} runs', '']
    for row in others:
      setting = ', '.join(f'{k}={row.get(k)}' for k in keys)
      lines += [f'- `{row["run_id"]}` ({setting}, seed {row["seed"]}), exit status {row["exit_status"]}, '
                f'{row["steps"]} steps; last lines of runs/{row["run_id"]}/log.txt:', '',
                '```', log_tail(run_dir(root, row['run_id'])), '```']
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def axes(meta: dict) -> list[tuple]:
  """What a plot's x axis can be: each grid key alone, and each zip group as one axis (its keys move together, so
  splitting lines by one of them against another would only show each point alone)."""
  zipped = [tuple(group) for group in meta.get('zip') or []]
  return [(key,) for key in meta['keys'] if not any(key in group for group in zipped)] + zipped


def plot(meta: dict, rows: list[dict], root: str, plot_dir: str) -> list[str]:
  """Metric vs each swept axis (a key, or a zip group's row; one line per setting of the other keys, error bars over
  seeds) and the eval-loss curves of every group, averaged over seeds; returns the files written."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(plot_dir, exist_ok=True)
  keys, written = meta['keys'], []
  finished = [r for r in rows if r['status'] == 'finished']
  metrics = [m for m in ('eval_loss', 'moe/dropped_fraction', 'moe/z_loss') if any(r.get(m) is not None for r in finished)]
  for axis in axes(meta):
    others = [k for k in keys if k not in axis]
    values = list(dict.fromkeys(tuple(r[k] for k in axis) for r in finished))
    numeric = len(axis) == 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for (v,) in values)
    position = {v: (v[0] if numeric else i) for i, v in enumerate(values)}
    short = [k.rsplit('.', 1)[-1] for k in axis]  # model.moe.top_k -> top_k
    for metric in metrics:
      fig, ax = plt.subplots(figsize=(6, 4))
      for rest, members in groups(finished, others).items():
        points = sorted((position[v], *mean_and_stderr([m.get(metric) for m in group]))
                        for v, group in groups(members, list(axis)).items())
        x, y, err = zip(*points)
        ax.errorbar(x, y, yerr=[0 if math.isnan(e) else e for e in err], marker='o', capsize=3,
                    label=', '.join(f'{k}={v}' for k, v in zip(others, rest)) or None)
      if not numeric:
        ax.set_xticks(list(position.values()), ['\n'.join(f'{k}={v}' for k, v in zip(short, row)) if len(axis) > 1
                                                else str(row[0]) for row in position])
      ax.set_xlabel(axis[0] if len(axis) == 1 else 'zip group: ' + ', '.join(short))
      ax.set_ylabel(metric)
      ax.grid(alpha=0.3)
      if others:
        ax.legend(fontsize=7)
      fig.tight_layout()
      written.append(os.path.join(plot_dir, f'{metric.replace("/", "_")}_vs_{"+".join(axis)}.png'))
      fig.savefig(written[-1], dpi=110)
      plt.close(fig)
  fig, ax = plt.subplots(figsize=(7, 4))
  for values, members in groups(finished, keys).items():
    curves = {}
    for member in members:
      for r in metrics_lib.read_rows(os.path.join(run_dir(root, member['run_id']), 'metrics.jsonl')):
        if 'eval_loss' in r:
          curves.setdefault(r['step'], []).append(r['eval_loss'])
    if curves:
      steps = sorted(curves)
      ax.plot(steps, [statistics.fmean(curves[s]) for s in steps], marker='o',
              label=', '.join(f'{k}={v}' for k, v in zip(keys, values)))
  ax.set_xlabel('step')
  ax.set_ylabel('eval loss (nats / token), mean over seeds')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  written.append(os.path.join(plot_dir, 'eval_loss_curves.png'))
  fig.savefig(written[-1], dpi=110)
  plt.close(fig)
  return written


def collect(root: str) -> list[dict]:
  """Writes ROOT/results.csv, ROOT/results.md and ROOT/plots/ from the runs' files; returns the rows."""
  meta, rows = read_sweep(root)
  write_csv(rows, os.path.join(root, 'results.csv'))
  write_markdown(meta, rows, root, os.path.join(root, 'results.md'))
  plot_dir = os.path.join(root, 'plots')
  written = plot(meta, rows, root, plot_dir)
  for name in os.listdir(plot_dir):  # a plot of an axis the spec no longer sweeps would pass for a current one
    if name.endswith('.png') and os.path.join(plot_dir, name) not in written:
      os.remove(os.path.join(plot_dir, name))
  return rows
