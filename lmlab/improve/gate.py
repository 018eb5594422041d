"""The gate: a candidate replaces the current model only if its held-out gain is significant and no guard regresses.

The gain's interval is the paired bootstrap of lmlab.eval.stats (the same resampled examples for both models), with
McNemar's exact p beside it for binary outcomes; a guard is a metric both models are measured on, with the most it
may get worse.
"""
import dataclasses

from lmlab.eval import stats


@dataclasses.dataclass(frozen=True)
class Guard:
  name: str
  current: float
  candidate: float
  tolerance: float               # the largest regression accepted, in the metric's units
  higher_is_better: bool = True

  def regression(self) -> float:
    """How much worse the candidate is (negative when better)."""
    return (self.current - self.candidate) if self.higher_is_better else (self.candidate - self.current)


def decide(candidate: list[float], current: list[float], guards: list[Guard] = (), n_boot: int = 1000,
           seed: int = 0, confidence: float = 0.95) -> dict:
  """{'accepted', 'reasons' (why not; empty when accepted), 'heldout' (paired comparison, candidate minus current),
  'guards'} for per-example held-out outcomes of both models on the same examples."""
  comparison = stats.paired_comparison(candidate, current, n_boot=n_boot, seed=seed, confidence=confidence)
  reasons = []
  if not comparison['ci_low'] > 0:
    reasons.append(f'held-out gain {comparison["difference"]:+.4f} is not significantly above 0: its '
                   f'{confidence:.0%} interval [{comparison["ci_low"]:+.4f}, {comparison["ci_high"]:+.4f}] does not '
                   'lie above 0')
  checked = []
  for g in guards:
    ok = g.regression() <= g.tolerance
    checked.append({**dataclasses.asdict(g), 'regression': g.regression(), 'passed': ok})
    if not ok:
      reasons.append(f'guard {g.name} regressed by {g.regression():.4f} (from {g.current:.4f} to {g.candidate:.4f}), '
                     f'more than its tolerance {g.tolerance:.4f}')
  return {'accepted': not reasons, 'reasons': reasons, 'heldout': comparison, 'guards': checked}
