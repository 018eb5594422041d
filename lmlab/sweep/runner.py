"""Runs a sweep: expand the spec, skip finished runs, hand the rest to a backend, collect the results.

ROOT/sweep.json records the spec as run; ROOT/runs/<run id>/run.json each run's values, command and exit status.
A rerun of the same sweep launches only runs without a summary.json; experiments.train resumes them from their
checkpoints.
"""
import dataclasses
import json
import os
import shlex

from lmlab.sweep import backends, collect, grid


def _write_json(path: str, value: dict) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(path + '.tmp', path)


def plan(spec: grid.Spec, root: str, entry: str) -> list[tuple[grid.Run, backends.Job, bool]]:
  """(run, job, finished) for every run of the spec, in grid order."""
  root = os.path.abspath(root)
  planned = []
  for run in grid.expand(spec):
    workdir = collect.run_dir(root, run.run_id)
    job = backends.Job(run.run_id, tuple(grid.command(spec, run, workdir, entry)), workdir, os.getcwd())
    planned.append((run, job, os.path.exists(os.path.join(workdir, 'summary.json'))))
  return planned


def run_sweep(spec: grid.Spec, root: str, backend=None, entry: str = 'experiments.train',
              dry_run: bool = False) -> list[dict]:
  """Runs what is not finished yet (all of it in one call to `backend`) and writes the results; returns the rows.

  With `dry_run` it prints every command (finished runs commented out) and runs nothing.
  """
  planned = plan(spec, root, entry)
  if dry_run:
    for _, job, finished in planned:
      print(('# finished: ' if finished else '') + shlex.join(job.command))
    return []
  os.makedirs(os.path.join(root, 'runs'), exist_ok=True)
  _write_json(os.path.join(root, 'sweep.json'), {
      **dataclasses.asdict(spec), 'entry': entry, 'keys': [*spec.grid, *(k for group in spec.zip for k in group)],
      'runs': [run.run_id for run, _, _ in planned]})
  todo = [(run, job) for run, job, finished in planned if not finished]
  for run, job in todo:
    os.makedirs(job.workdir, exist_ok=True)
    _write_json(os.path.join(job.workdir, 'run.json'),
                {'overrides': run.overrides, 'seed': run.seed, 'command': list(job.command), 'exit_status': None})
  print(f'sweep: {len(planned)} runs, {len(planned) - len(todo)} already finished, running {len(todo)}', flush=True)
  statuses = backend.run([job for _, job in todo]) if todo else {}
  for run, job in todo:
    info_path = os.path.join(job.workdir, 'run.json')
    with open(info_path) as f:
      info = json.load(f)
    _write_json(info_path, {**info, 'exit_status': statuses.get(run.run_id)})
  rows = collect.collect(root)
  failed = [row for row in rows if row['status'] != 'finished']
  print(f'sweep: {len(rows) - len(failed)} of {len(rows)} runs finished; results in {root}/results.csv, '
        f'results.md, plots/' + (f'; not finished: {", ".join(r["run_id"] for r in failed)} (see results.md)'
                                 if failed else ''), flush=True)
  return rows
