"""Terminal rendering for the CLI: the live search display and the trials table (rich).

Kept apart from ``cli/`` so the commands read as argument handling only, and from ``search/`` so the search
never depends on a terminal.
"""
from __future__ import annotations

import collections
import datetime as dt
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from kfac_tune import record

if TYPE_CHECKING:
    import optuna

# complete and pruned trials rank together, by the study's quantity (a pruned one by its value when cut): a trial
# cut while it stood better than every completed one is the search's best lead, not its worst
STATE_ORDER = {"COMPLETE": 0, "PRUNED": 0, "RUNNING": 1, "WAITING": 2, "FAIL": 3}
# Width of a console whose stream is a pipe or a file: room for any table's natural width. Rich's own default
# there is 80 columns, which folds and cuts cells ("diver") in output meant for logs, files and `less -S`.
PIPED_WIDTH = 1000


def output_console(stderr: bool = False) -> Console:
    """The console a command prints its results with: the terminal's width on a terminal; when piped or
    redirected, tables at their natural width (``COLUMNS``, if set, still wins). Scripts should use ``-f json``."""
    stream = sys.stderr if stderr else sys.stdout
    if os.environ.get("COLUMNS") or stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=PIPED_WIDTH)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


def plain(value: Any, style: str = "") -> Text:
    """``value`` as rich prints it, never read as markup: a table cell or title holding a stored string (a study
    name, a fail reason, a recipe's dataset) is data; as markup ``[/x]`` crashed the command (MarkupError) and
    ``[link=...]`` made a link. Markup of our own goes in ``style``."""
    return Text(value if isinstance(value, str) else fmt(value), style=style)


def safe(value: Any) -> str:
    """``value`` escaped for a line of our own markup (``f"study [bold]{safe(name)}[/]"``)."""
    return escape(str(value))


def plain_table(title: str | None = None, **options: Any) -> Table:
    """A rich Table whose title is printed as is (see :func:`plain`)."""
    return Table(title=None if title is None else plain(title), **options)


def add_plain_row(table: Table, *cells: Any) -> None:
    """A row of cells printed as they are (see :func:`plain`); a ``Text`` cell keeps its own styles."""
    table.add_row(*(cell if isinstance(cell, Text) else plain(cell) for cell in cells))


def sort_trials(trials: Iterable[optuna.trial.FrozenTrial], maximize: bool,
                index: int = 0) -> list[optuna.trial.FrozenTrial]:
    """Best first: complete trials by value (objective ``index``) and pruned ones by their value when cut (the
    quantity the pruner judged), together; then the rest by number."""

    def key(trial: optuna.trial.FrozenTrial) -> tuple[int, float, int]:
        value = trial.values[index] if trial.values is not None else value_when_cut(trial)
        ranked = value if value is not None and math.isfinite(value) else math.inf
        return STATE_ORDER.get(trial.state.name, 5), (-ranked if maximize and ranked != math.inf else ranked), trial.number

    return sorted(trials, key=key)


def value_when_cut(trial: optuna.trial.FrozenTrial) -> float | None:
    """The last value a pruned trial reported, where the pruner cut it; None for one that diverged (its earlier
    reports say nothing of where it ended) or never reported."""
    values = trial.intermediate_values
    if not values or str(record.reason(trial) or "").startswith("diverged"):
        return None
    return values[max(values)]


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One plain dict per trial, best first: the data behind ``show`` in every format.

    ``value`` is the metric; a study with several objectives adds ``values`` (per objective name) and ``pareto``
    (the trial is on the Pareto front)."""
    from kfac_tune.search.race import raced_values
    from kfac_tune.search.selection import metric_index, metric_names, pareto_front

    index = metric_index(study)
    names = metric_names(study)
    several = len(study.directions) > 1
    front = {t.number for t in pareto_front(study)} if several else set()
    rows = []
    for trial in sort_trials(study.get_trials(deepcopy=False), study.directions[index].name == "MAXIMIZE", index):
        duration = trial.duration.total_seconds() if trial.duration else None
        row = {"number": trial.number, "state": trial.state.name,
               "value": None if trial.values is None else trial.values[index], "params": dict(trial.params),
               "duration_s": None if duration is None else round(duration, 3), "reason": record.reason(trial)}
        if trial.state.name == "PRUNED":
            row["value_when_cut"] = value_when_cut(trial)
        seeds = raced_values(study, trial)
        if seeds is not None:
            finite = [v for v in seeds.values() if v is not None]
            row["seeds"] = {"values": {str(k): v for k, v in seeds.items()}, "mean": statistics.fmean(finite),
                            "spread": statistics.stdev(finite) if len(finite) > 1 else 0.0,
                            "diverged": len(seeds) - len(finite)} if finite else None
        if several:
            row["values"] = None if trial.values is None else dict(zip(names, trial.values))
            row["pareto"] = trial.number in front
        rows.append(row)
    return rows


def pareto_table(rows: Sequence[dict[str, Any]], title: str) -> Table:
    """The Pareto front of a study with several objectives: one row per non-dominated trial, best metric first."""
    front = [row for row in rows if row.get("pareto")]
    names = list(front[0]["values"]) if front else []
    table = plain_table(title, header_style="bold")
    table.add_column("#", justify="right", min_width=3)
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("params", overflow="fold", min_width=30, ratio=1)
    for row in front:
        params = " ".join(f"{name}={fmt(value)}" for name, value in row["params"].items())
        add_plain_row(table, str(row["number"]), *(fmt(row["values"][name]) for name in names), params)
    return table


def trials_table(rows: Sequence[dict[str, Any]], metric: str, title: str | None = None) -> Table:
    """Parameters share one column (``name=value`` pairs) so the table fits a terminal whatever the space."""
    table = plain_table(title, header_style="bold")
    table.add_column("#", justify="right", min_width=3)
    table.add_column("state", no_wrap=True)
    table.add_column(metric, justify="right", no_wrap=True)
    raced = any(row.get("seeds") for row in rows)
    if raced:
        table.add_column("seeds: mean ± std", justify="right", no_wrap=True)
    table.add_column("params", overflow="fold", min_width=30, ratio=1)
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("reason", overflow="ellipsis", no_wrap=True, max_width=32)
    styles = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan"}  # WAITING: plain
    for row in rows:
        duration = "" if row["duration_s"] is None else str(dt.timedelta(seconds=round(row["duration_s"])))
        params = " ".join(f"{name}={fmt(value)}" for name, value in row["params"].items())
        state = plain(row["state"], styles.get(row["state"], ""))
        cut = row.get("value_when_cut")
        value = plain(fmt(row["value"])) if cut is None else plain(fmt(cut), "dim")
        seeds = [_seeds_cell(row.get("seeds"))] if raced else []
        add_plain_row(table, str(row["number"]), state, value, *seeds, params, duration, row["reason"] or "")
    return table


def _seeds_cell(seeds: dict[str, Any] | None) -> str:
    """A raced trial's mean ± std over its seeds (``search.race``), and how many seeds."""
    if not seeds:
        return ""
    diverged = f", {seeds['diverged']} diverged" if seeds["diverged"] else ""
    return f"{fmt(seeds['mean'])} ± {fmt(seeds['spread'])} ({len(seeds['values'])}{diverged})"


class SearchDisplay:
    """A progress bar over the trial budget and a live 'best so far' line, updated after each trial."""

    def __init__(self, console: Console, budget: int, metric: str) -> None:
        self.console, self.metric = console, metric
        self.progress = Progress(TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[states]}"), console=console)
        self.task = self.progress.add_task("search", total=budget, states="")
        self.best = Table.grid(padding=(0, 1))
        self.live = Live(Group(self.progress, self.best), console=console, refresh_per_second=4, transient=False)

    def __enter__(self) -> SearchDisplay:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        """Leave the last frame, then a blank line, so the next output (the table, ``Error:``) starts apart from it.

        Rich ends a live display with a newline only on a terminal; piped, the frame's last line stays open."""
        self.live.__exit__(*exc)  # type: ignore[arg-type]
        if not self.console.is_terminal:
            self.console.line()
        self.console.line()

    def racing(self, trial: int, seed: int) -> None:
        """The race after the search (``search.race``): which run is training now."""
        grid = Table.grid(padding=(0, 1))
        grid.add_row(f"[bold]race[/]: trial {trial} on seed {seed}")
        self.live.update(Group(self.progress, self.best, grid))

    def update(self, study: optuna.Study) -> None:
        counts = collections.Counter(trial.state.name for trial in study.get_trials(deepcopy=False))
        finished = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
        states = "  ".join(f"{name.lower()} {n}" for name, n in sorted(counts.items()))
        self.progress.update(self.task, completed=finished, states=states)
        self.best = best_line(study, self.metric)
        self.live.update(Group(self.progress, self.best))


def best_line(study: optuna.Study, metric: str) -> Table:
    from kfac_tune.search.selection import Pick, choose, metric_value, pareto_front

    grid = Table.grid(padding=(0, 1))
    try:
        best = choose(study, Pick())
    except ValueError:
        grid.add_row("[dim]best so far: no completed trial yet")
        return grid
    params = safe(", ".join(f"{k}={fmt(v)}" for k, v in best.params.items()))
    front = f"  [dim]Pareto front: {len(pareto_front(study))} trials" if len(study.directions) > 1 else ""
    value = fmt(metric_value(study, best))
    grid.add_row(f"[bold green]best so far[/]: trial {best.number}  {safe(metric)} = {value}  ({params}){front}")
    return grid


def comparison_table(rows: Sequence[dict[str, Any]], metric: str, target: float | None, maximize: bool,
                     title: str) -> Table:
    """``kfac-tune compare``: one row per recipe, every cell ``mean ± spread`` over the seeds; ``recorded`` is what
    the recipe promised (its value on its own split, over the seeds it was raced on) to read the runs against."""
    table = plain_table(title, header_style="bold", caption=None if target is None else
                        plain(f"common target: {metric} {'≥' if maximize else '≤'} {fmt(target)} "
                              "(the best value every run of every recipe reaches)"))
    for name, justify in (("recipe", "left"), ("optimizer", "left"), ("recorded", "right"),
                          (f"final {metric}", "right"), ("final test", "right"),
                          ("steps to target", "right"), ("seconds to target", "right"), ("ms / step", "right"),
                          ("seeds", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        seeds = Text.assemble(f"{row['seeds']}", (f" ({row['diverged']} diverged)", "red") if row["diverged"] else "")
        promised = row["recorded"]
        kind = "" if promised["objective"] == "final" else f" {promised['objective']}"
        recorded = f"{_pm(promised)} ({promised['seeds']} seed{'s' * (promised['seeds'] > 1)}{kind})"
        if not row["seeds"]:
            add_plain_row(table, row["recipe"], row["optimizer"], recorded, plain("diverged", "red"), "", "", "", "",
                          seeds)
            continue
        add_plain_row(table, row["recipe"], row["optimizer"], recorded, _pm(row["final"]), _pm(row.get("final_test")),
                      _pm(row["steps_to_target"], "{:.0f}"),
                      _pm(row["seconds_to_target"], "{:.2f}"), _pm(row["step_time_ms"], "{:.2f}"), seeds)
    return table


def _pm(stat: dict[str, float] | None, pattern: str = "{:.4g}") -> str:
    if stat is None:
        return "—"
    return f"{pattern.format(stat['mean'])} ± {pattern.format(stat['spread'])}"


def match_rows(matches: Iterable[Any]) -> list[dict[str, Any]]:
    """One plain dict per ``recipes.Match``, closest first: what ``recipe find`` prints as a table, JSON or YAML."""
    return [{"path": str(m.path), "match": m.kind, "distance": round(m.distance, 3), "optimizer": m.recipe.optimizer,
             "architecture": m.recipe.architecture, "dataset": m.recipe.training.dataset,
             "metric": m.recipe.result.metric, "value": m.recipe.result.value, "trials": m.recipe.result.trials}
            for m in matches]


def matches_table(rows: Sequence[dict[str, Any]], title: str) -> Table:
    """``kfac-tune recipe find``: the closest recipes first."""
    table = plain_table(title, header_style="bold")
    for name in ("path", "match", "distance", "architecture", "dataset", "value", "trials"):
        table.add_column(name, overflow="fold" if name == "path" else "ellipsis")
    for row in rows:
        add_plain_row(table, short_path(row["path"]), row["match"], fmt(row["distance"]), row["architecture"],
                 row["dataset"], f"{row['metric']} {fmt(row['value'])}", str(row["trials"]))
    return table


def describe_match(match: Any) -> str:
    """One line about a ``recipes.Match``: which file, how close, what it promised."""
    closeness = {"exact": "same architecture and signature", "architecture": "same architecture, other shapes",
                 "nearest": "nearest layer shapes"}[match.kind]
    result = match.recipe.result
    return (f"{short_path(match.path)} ({closeness}, distance {match.distance:.3g}; {result.metric} "
            f"{fmt(result.value)} after {result.trials} trials on {match.recipe.training.dataset})")


def short_path(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies below it (shipped recipes are found by absolute path)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
