"""What an evaluation leaves on disk: the samples JSONL and a report.md with the worst examples and slices, a
reliability diagram per multiple-choice task and, for a classification fine-tune, its confusion matrix (PNGs)."""
import json
import os
import re

import numpy as np

from lmlab.eval import compare, tasks

WORST = 10  # examples and slices listed per task


def write_samples(path: str, samples: list[dict]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(json.dumps(s, ensure_ascii=False) + '\n' for s in samples)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_reliability(reliability: dict, path: str, title: str = '') -> None:
  """Accuracy against confidence per bin (bars, with the count) and the diagonal of perfect calibration."""
  plt = _pyplot()
  edges = np.asarray(reliability['edges'])
  centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
  accuracy = [a if a is not None else 0.0 for a in reliability['accuracy']]
  fig, ax = plt.subplots(figsize=(5, 5))
  ax.bar(centers, accuracy, width=width, edgecolor='black', alpha=0.7, label='accuracy')
  ax.plot([0, 1], [0, 1], color='gray', linestyle='--', label='perfect calibration')
  for x, a, n in zip(centers, accuracy, reliability['counts']):
    if n:
      ax.annotate(str(n), (x, a), ha='center', va='bottom', fontsize=7)
  ax.set(xlim=(0, 1), ylim=(0, 1.05), xlabel='confidence (max choice probability)', ylabel='accuracy', title=title)
  ax.legend(loc='upper left')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_confusion(confusion_TP, labels: list[str], path: str) -> None:
  """Counts per (true, predicted) class, rows true."""
  plt = _pyplot()
  confusion_TP = np.asarray(confusion_TP)
  n = len(confusion_TP)
  fig, ax = plt.subplots(figsize=(max(4, 0.6 * n + 2), max(3.5, 0.6 * n + 1.5)))
  image = ax.imshow(confusion_TP, cmap='Blues')
  for (t, p), count in np.ndenumerate(confusion_TP):
    ax.text(p, t, str(int(count)), ha='center', va='center', fontsize=8,
            color='white' if count > confusion_TP.max() / 2 else 'black')
  ax.set_xticks(range(n), labels, rotation=45, ha='right')
  ax.set_yticks(range(n), labels)
  ax.set(xlabel='predicted', ylabel='true')
  fig.colorbar(image, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def workdir_confusion(model) -> tuple[list[list[int]], list[str]] | None:
  """(confusion matrix, label names) of a classification fine-tune workdir's eval summary, else None."""
  labels = (getattr(model, 'metadata', None) or {}).get('finetune', {}).get('labels')
  workdir = model.source.rsplit(' step ', 1)[0]
  summary_path = os.path.join(workdir, 'summary.json')
  if not labels or not os.path.isfile(summary_path):
    return None
  with open(summary_path) as f:
    confusion = json.load(f).get('eval_confusion')
  return (json.loads(confusion), labels) if confusion else None


def _slug(task: str) -> str:
  """'mc:/data/arc.jsonl' -> 'mc_arc_jsonl', for file names beside the report."""
  kind, _, path = task.partition(':')
  return re.sub(r'[^A-Za-z0-9]+', '_', f'{kind}_{os.path.basename(path)}').strip('_')


def _primary(kind: str) -> tuple[str, bool]:
  """The metric the report ranks slices by, and whether higher is better."""
  return {'mc': ('acc', True), 'gen': ('exact_match_flexible', True), 'ppl': ('bits_per_byte', False)}[kind]


def _worst_examples(kind: str, samples: list[dict]) -> list[tuple[str, dict]]:
  """(why, sample) for the worst examples: confidently wrong choices, wrong answers, the least likely documents."""
  if kind == 'mc':
    margin = lambda s: s['logliks'][s['pred']] - s['logliks'][s['label']]
    wrong = sorted((s for s in samples if not s['correct']), key=lambda s: -margin(s))
    return [(f'chose another by {margin(s):.3f} nats', s) for s in wrong[:WORST]]
  if kind == 'gen':
    wrong = [s for s in samples if not s['correct']['flexible']]
    return [(f'answer {s["answer"]!r}, extracted {s["extracted"]["flexible"]!r}', s) for s in wrong[:WORST]]
  ranked = sorted(samples, key=lambda s: -s['bits_per_byte'])
  return [(f'{s["bits_per_byte"]:.3f} bits/byte', s) for s in ranked[:WORST]]


def _example_text(kind: str, sample: dict) -> str:
  if kind == 'mc':
    text = f'{sample["context"]!r:.160} -> predicted {sample["choices"][sample["pred"]]!r:.60}, ' \
           f'gold {sample["choices"][sample["label"]]!r:.60}'
  elif kind == 'gen':
    text = f'{sample["prompt"]!r:.160} -> {sample["output"]!r:.120}'
  else:
    text = f'{sample["bytes"]} bytes'
  return text.replace('|', '\\|')


def task_section(results: dict, samples: list[dict], directory: str, comparison: dict | None = None) -> list[str]:
  """report.md lines for one task (writes its reliability PNG into `directory`)."""
  kind = results['kind']
  lines = [f'## {results["task"]}', '', f'model: {results["model"]}; n = {results["n"]}; '
           f'sha256 {results["fingerprint"][:16]}', '', '| metric | value | stderr |', '|---|---|---|']
  for name, value in results.items():
    if isinstance(value, float) and not name.endswith('_stderr'):
      stderr = results.get(f'{name}_stderr')
      lines.append(f'| {name} | {value:.4f} | {"" if stderr is None else f"{stderr:.4f}"} |')
  if comparison:
    lines += ['', f'Paired comparison, {comparison["a"]} minus {comparison["b"]} (tokenizers: '
              f'{comparison["tokenizers"]}):', '', '| metric | difference | 95% interval | McNemar p |',
              '|---|---|---|---|']
    for name, c in comparison['metrics'].items():
      p = '' if c['p_value'] is None else f'{c["p_value"]:.4g}'
      lines.append(f'| {name} | {c["difference"]:+.4f} | [{c["ci_low"]:+.4f}, {c["ci_high"]:+.4f}] | {p} |')
  if 'reliability' in results:
    png = f'reliability_{_slug(results["task"])}.png'
    plot_reliability(results['reliability'], os.path.join(directory, png), results['task'])
    lines += ['', f'Reliability diagram (ECE {results["ece"]:.4f}): ![reliability]({png})']
  metric, higher = _primary(kind)
  ranked = sorted(results['slices'].items(), key=lambda item: item[1][metric] * (1 if higher else -1))
  lines += ['', f'Worst slices by {metric}:', '', f'| slice | n | {metric} |', '|---|---|---|']
  lines += [f'| {key} | {m["n"]} | {m[metric]:.4f} |' for key, m in ranked[:WORST]]
  lines += ['', 'Worst examples:', '', '| line | why | example |', '|---|---|---|']
  lines += [f'| {s["line"]} | {why} | {_example_text(kind, s)} |' for why, s in _worst_examples(kind, samples)]
  return lines + ['']


def write_report(path: str, sections: list[list[str]], confusion: tuple[list, list[str]] | None = None) -> None:
  """report.md from task sections, with the confusion matrix PNG beside it when given."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  lines = ['# Evaluation report', '']
  if confusion is not None:
    plot_confusion(confusion[0], confusion[1], os.path.join(directory, 'confusion.png'))
    lines += ['Fine-tuning eval confusion matrix (rows true, columns predicted): ![confusion](confusion.png)', '']
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines + [line for section in sections for line in section]))


def evaluate_to_files(model, specs: list, settings, samples_jsonl: str | None, report_md: str | None,
                      other=None) -> dict:
  """Runs every task on `model` (and on `other`, compared pairwise), writes the samples and the report, and
  returns {'model', 'tasks': {task: results}} plus, with `other`, 'compare': {'model', 'tokenizers', 'tasks':
  {task: {'results': other's results, 'comparison': {metric: paired comparison}}}}."""
  out, all_samples, sections = {'model': model.source, 'tasks': {}}, [], []
  if other is not None:
    same = compare.same_tokenizer(model.tokenizer, other.tokenizer)
    out['compare'] = {'model': other.source, 'tokenizers': 'same' if same else 'different', 'tasks': {},
                      **({} if same else {'note': compare.DIFFERENT_TOKENIZERS})}
  for spec in specs:
    results, samples = tasks.evaluate_task(model, spec, settings)
    out['tasks'][results['task']] = results
    all_samples += [{'model': model.source, **s} for s in samples]
    shown = None
    if other is not None:
      results_b, samples_b = tasks.evaluate_task(other, spec, settings)
      metrics = compare.compare(results['kind'], samples, samples_b, settings.n_boot, settings.seed)
      out['compare']['tasks'][results['task']] = {'results': results_b, 'comparison': metrics}
      all_samples += [{'model': other.source, **s} for s in samples_b]
      shown = {'a': model.source, 'b': other.source, 'tokenizers': out['compare']['tokenizers'], 'metrics': metrics}
    if report_md:
      os.makedirs(os.path.dirname(os.path.abspath(report_md)), exist_ok=True)
      sections.append(task_section(results, samples, os.path.dirname(os.path.abspath(report_md)), shown))
  if samples_jsonl:
    write_samples(samples_jsonl, all_samples)
  if report_md:
    write_report(report_md, sections, workdir_confusion(model))
  return out
