"""DIR/lineage.json (the accepted models in order, the base first) and DIR/progress.png (held-out score and reward
per iteration), both rebuilt from the iteration directories so they never disagree with them."""
import os

from lmlab.improve import records


def entries(base: dict, decisions: list[dict]) -> list[dict]:
  """The base, then every accepted iteration, each {iteration, model, heldout}."""
  out = [base]
  for d in decisions:
    if d['accepted']:
      out.append({'iteration': d['iteration'], 'model': d['candidate'], 'heldout': d['candidate_heldout']})
  return out


def write(workdir: str, base: dict, decisions: list[dict]) -> list[dict]:
  lineage = entries(base, decisions)
  records.write_json(os.path.join(workdir, 'lineage.json'), lineage)
  plot(os.path.join(workdir, 'progress.png'), base, decisions)
  return lineage


def plot(path: str, base: dict, decisions: list[dict]) -> None:
  """Held-out accuracy of each candidate (filled: accepted, open: rejected) and the mean reward of its samples."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
  fig, (ax_score, ax_reward) = plt.subplots(1, 2, figsize=(9, 3.5))
  its = [d['iteration'] for d in decisions]
  ax_score.plot([0] + its, [base['heldout']] + [d['candidate_heldout'] for d in decisions], color='tab:blue')
  for d in decisions:
    ax_score.scatter(d['iteration'], d['candidate_heldout'], color='tab:blue',
                     facecolors='tab:blue' if d['accepted'] else 'none', zorder=3)
  ax_score.scatter(0, base['heldout'], color='tab:blue', zorder=3)
  ax_score.set(xlabel='iteration', ylabel='held-out accuracy', title='held-out (filled: accepted)')
  ax_reward.plot(its, [d['mean_reward'] for d in decisions], marker='o', color='tab:orange')
  ax_reward.set(xlabel='iteration', ylabel='mean reward of samples', title='reward')
  for ax in (ax_score, ax_reward):
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)
