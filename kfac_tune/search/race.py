"""The race before a recipe is written: the study's best few trials trained again on more seeds, the best mean kept.

Why: a search selects on one seed's value, and on small data that value is partly luck: a trial that drew a good
initialisation and batch order wins, and its recipe does not keep its promise on the next seed (seen on a
stranger's tabular model: validation 0.128 selected, 0.316 +- 0.244 over 3 fresh seeds). Racing the leaders on a
few more seeds and keeping the best *mean* costs a handful of runs, not a study.

How (SMAC-style intensification, Hutter et al. 2011): the ``race.top`` best complete trials are candidates, each
with its own run as seed ``training.seed``. Seed by seed (``training.seed + 1``, ``+ 2``, ... up to ``race.seeds``
seeds in all), every surviving candidate trains once with its trial's settings under the study's own budget; after
each seed (from the second on), a candidate whose mean is worse than the leader's by more than their combined
standard errors (``sqrt(se_a^2 + se_b^2)``, ``se = std / sqrt(n)``) is dropped, and a candidate with a diverged
run is dropped at once. The chosen trial is the best mean among the survivors that ran the most seeds.

Each run's value is stored on the study as it finishes (``record.set_race_run``), so ``export`` reads the race
instead of running it again, and a process killed during the race loses at most the run it was in.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from optuna.trial import FrozenTrial

from kfac_tune import record
from kfac_tune.config import TIME_OBJECTIVE, Config, RaceConfig
from kfac_tune.search import selection
from kfac_tune.search.space import with_training

RunCallback = Callable[[int, int], None]  # (trial number, seed) before each run


@dataclass
class Candidate:
    """One raced trial and its value on each seed it ran (``inf`` in the bad direction for a diverged run)."""

    trial: FrozenTrial
    values: dict[int, float]
    dropped_after: int | None = None  # seeds it had run when it was dropped

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values.values())

    @property
    def spread(self) -> float:
        """The sample standard deviation over its seeds (0 for one)."""
        finite = [v for v in self.values.values() if math.isfinite(v)]
        return statistics.stdev(finite) if len(finite) > 1 else 0.0

    def standard_error(self) -> float:
        return self.spread / math.sqrt(len(self.values))


@dataclass
class RaceOutcome:
    chosen: Candidate
    candidates: list[Candidate]
    runs: int = 0  # training runs this call made (stored runs are read, not counted)
    seconds: float = 0.0  # wall seconds of those runs
    stopped_early: bool = False  # the deadline ended the race before every surviving candidate ran every seed
    dropped: list[Candidate] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return sorted(self.chosen.values)

    def as_dict(self) -> dict[str, object]:
        """The race as plain data (``search -f json``)."""
        return {"chosen": self.chosen.trial.number, "runs": self.runs, "seconds": round(self.seconds, 3),
                "stopped_early": self.stopped_early,
                "candidates": [{"trial": c.trial.number, "mean": c.mean, "spread": c.spread,
                                "values": {str(k): v for k, v in sorted(c.values.items())},
                                "dropped_after": c.dropped_after} for c in self.candidates]}


def applies(study: optuna.Study) -> bool:
    """A race ranks one metric: a study with several objectives has a Pareto front instead."""
    return len(study.directions) == 1


def fits(race: RaceConfig, trials: int) -> bool:
    """Whether the trial budget holds the race: it is on (``seeds > 1``) and its most runs take at most half of
    the budget, so the search itself keeps the other half (a budget of 6 trials does not race 3 x 3)."""
    return race.seeds > 1 and 2 * race.runs <= trials


def search_budget(race: RaceConfig, trials: int) -> int:
    """The finished trials the search runs before its race, so that search and race together stay in ``trials``."""
    return trials - race.runs if fits(race, trials) else trials


def run_race(study: optuna.Study, cfg: Config, top: int, seeds: int, *, deadline: float | None = None,
             on_run: RunCallback | None = None) -> RaceOutcome:
    """Race the study's ``top`` best complete trials on ``seeds`` seeds in all (see the module docstring).

    Runs already stored on the study are read, not repeated. ``deadline`` (``time.time()``) stops the race
    before a run that would start after it; the choice is then made among the candidates that ran the most seeds.
    """
    maximize = study.directions[selection.metric_index(study)] == optuna.study.StudyDirection.MAXIMIZE
    sign = -1.0 if maximize else 1.0
    worst = -math.inf if maximize else math.inf
    base = cfg.training.seed
    ranked = sorted(selection.candidates(study), key=lambda t: (sign * selection.metric_value(study, t), t.number))
    candidates = [Candidate(t, {base: selection.metric_value(study, t)}) for t in ranked[:top]]
    if not candidates:
        raise ValueError(f"study {study.study_name!r} has no completed trial with a finite metric")
    outcome = RaceOutcome(candidates[0], candidates)
    alive = list(candidates)
    for seed in range(base + 1, base + seeds):
        for candidate in sorted(alive, key=lambda c: sign * c.mean):
            stored = record.race_runs(study, candidate.trial.number)
            if seed not in stored:
                if deadline is not None and time.time() >= deadline:
                    outcome.stopped_early = True
                    break
                if on_run is not None:
                    on_run(candidate.trial.number, seed)
                started = time.perf_counter()
                stored[seed] = _run(study, cfg, candidate.trial, seed)
                outcome.seconds += time.perf_counter() - started
                outcome.runs += 1
                record.set_race_run(study, candidate.trial.number, seed, stored[seed])
            candidate.values[seed] = worst if stored[seed] is None else stored[seed]
        if outcome.stopped_early:  # choose on the seeds every survivor ran: drop the unfinished round
            for candidate in alive:
                candidate.values.pop(seed, None)
            break
        alive = _survivors(alive, sign, seed - base + 1, outcome.dropped)
    most = max(len(c.values) for c in alive)
    outcome.chosen = min((c for c in alive if len(c.values) == most), key=lambda c: (sign * c.mean, c.trial.number))
    return outcome


def _survivors(alive: list[Candidate], sign: float, seeds_run: int, dropped: list[Candidate]) -> list[Candidate]:
    """Drop the candidates clearly worse than the leader: a diverged run, or a mean worse by more than the two
    means' combined standard error."""
    leader = min(alive, key=lambda c: sign * c.mean)
    kept = []
    for candidate in alive:
        gap = sign * (candidate.mean - leader.mean)
        noise = math.hypot(candidate.standard_error(), leader.standard_error())
        if candidate is not leader and (not math.isfinite(candidate.mean) or gap > noise):
            candidate.dropped_after = seeds_run
            dropped.append(candidate)
        else:
            kept.append(candidate)
    return kept


def _run(study: optuna.Study, cfg: Config, trial: FrozenTrial, seed: int) -> float | None:
    """The trial's settings trained on ``seed`` under the study's budget: the value its objective reports, or
    None when it diverged."""
    from kfac_tune.search.quantity import metric_objective
    from kfac_tune.training import Diverged, train, warm_up

    selection.check_rerunnable(study, cfg, f"racing trial {trial.number} on more seeds")
    rerun = with_training(cfg, trial.params)
    rerun = rerun.model_copy(update={"training": rerun.training.model_copy(update={"seed": seed})})
    hparams = selection.trial_arguments(trial, cfg.optimizer.name)
    optimizer = record.study_attr(study, record.OPTIMIZER)
    if rerun.training.budget is not None or TIME_OBJECTIVE in cfg.objectives:
        warm_up(rerun, hparams)  # as a timed trial does (Objective._warm_up): the clock measures training alone
    try:
        value = metric_objective(cfg, train(rerun, hparams, optimizer=optimizer))
    except Diverged:
        return None
    return value if math.isfinite(value) else None


def raced_values(study: optuna.Study, trial: FrozenTrial) -> dict[int, float | None] | None:
    """A raced trial's value on each seed it ran (its own run on ``training.seed`` first; None: diverged), or
    None for a trial that was not raced."""
    runs = record.race_runs(study, trial.number)
    if not runs or trial.values is None:
        return None
    base = int((study.user_attrs.get(record.CONFIG) or {}).get("training", {}).get("seed", 0))
    return {base: selection.metric_value(study, trial), **dict(sorted(runs.items()))}


def planned_race(study: optuna.Study, cfg: Config, pick: str, top: int | None = None, seeds: int | None = None, *,
                 on_run: RunCallback | None = None) -> RaceOutcome | None:
    """``export``'s race: the one the search planned (``record.race_plan``), with ``top``/``seeds`` given by the
    user instead, for ``--pick best`` on a single-objective study with a completed trial; None when there is
    none. Stored runs are read, so exporting a raced study trains nothing new."""
    plan = record.race_plan(study) or {"top": cfg.search.race.top, "seeds": 1}
    top, seeds = top or plan["top"], seeds or plan["seeds"]
    if selection.parse_pick(pick).within is not None or seeds < 2 or not applies(study) \
            or not selection.candidates(study):
        return None
    return run_race(study, cfg, top, seeds, on_run=on_run)


def summary(outcome: RaceOutcome, metric: str) -> str:
    """One line on what the race did and cost, for the end of a search and for ``export``."""
    chosen = outcome.chosen
    dropped = "; ".join(f"trial {c.trial.number} dropped after {c.dropped_after} seeds" for c in outcome.dropped)
    cost = f"{outcome.runs} extra run{'s' * (outcome.runs != 1)} ({outcome.seconds:.1f} s)"
    early = "; stopped at the search's deadline" if outcome.stopped_early else ""
    return (f"race: {len(outcome.candidates)} candidates, {cost}{'; ' + dropped if dropped else ''}{early}; chose "
            f"trial {chosen.trial.number}, {metric} {chosen.mean:.4g} ± {chosen.spread:.2g} over seeds "
            f"{', '.join(map(str, outcome.seeds))}")
