"""The plots of a study, rendered onto its MLflow parent run: optimisation history, intermediate values, the best
trials' loss curves, the Pareto front, importances and the lr x damping contour, each as a PNG and all of them
on one interactive page.

Plots are a view on the study and must never stop it: one that cannot be drawn yet is skipped.
"""
from __future__ import annotations

import html
import logging
import math
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from kfac_tune import record

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure as MplFigure
    from mlflow import MlflowClient
    from plotly.graph_objects import Figure as PlotlyFigure

log = logging.getLogger(__name__)

BEST_CURVES = 5
CURVE_METRIC = "eval_loss"
CONTOUR_PARAMS = ("lr", "damping")
# The one page holding every interactive plot of a study: plotly.js (~4.6 MB) is inlined once for all of them.
# Not one page per plot: each would carry its own copy (~19 MB a study). Not a shared plotly.min.js artifact
# either: the MLflow UI shows an HTML artifact from a blob: URL in a sandboxed iframe, where a relative script
# path does not resolve, and its server sends .js artifacts as text/plain with nosniff, which browsers refuse
# to execute. A CDN link would leave the plots blank on machines without internet access.
INTERACTIVE_PAGE = "interactive.html"
# PED-ANOVA (Optuna 5's default importance) contrasts the top 10 % of complete trials with the rest; below ten
# trials that top set is empty or a single trial and Optuna reports all importances as equal.
MIN_TRIALS_FOR_IMPORTANCE = 10

_FigurePair = tuple["PlotlyFigure", "MplFigure"]


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial of a single-objective study, or ``None`` (no complete trial, or several objectives)."""
    try:
        return study.best_trial
    except (ValueError, RuntimeError):
        return None


def render_plots(study: optuna.Study, client: MlflowClient, out_dir: Path) -> list[str]:
    """Write ``<name>.png`` (matplotlib) for every plot that applies, and all of them as interactive plotly figures
    on one page, ``INTERACTIVE_PAGE``, sharing a single inlined plotly.js.

    A plot that cannot be drawn yet (too few trials, a missing parameter) is skipped with a debug message:
    plots are a view on the study and must never stop it. Returns the names written.
    """
    import matplotlib.pyplot as plt

    written, interactive = [], []
    for name, build in _plot_builders(study, client).items():
        with _isolated_plotting():
            try:
                pair = build()
            except Exception as err:  # optuna raises ValueError/RuntimeError/ZeroDivisionError on thin studies
                log.debug("plot %s skipped: %s", name, err)
                continue
            if pair is None:
                continue
            plotly_fig, mpl_fig = pair
            interactive.append(plotly_fig.to_html(include_plotlyjs=not interactive, full_html=False, div_id=name))
            mpl_fig.savefig(out_dir / f"{name}.png", dpi=100, bbox_inches="tight")
            plt.close(mpl_fig)
        written.append(name)
    if interactive:
        title = f"kfac-tune study {study.study_name}"
        (out_dir / INTERACTIVE_PAGE).write_text(
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
            f"<body><h2>{html.escape(title)}</h2>\n" + "\n".join(interactive) + "\n</body></html>\n",
            encoding="utf-8")
    return written


@contextmanager
def _isolated_plotting() -> Iterator[None]:
    """Keep optuna's matplotlib backend from leaking into the process.

    It calls ``plt.style.use("ggplot")`` (global rcParams) and warns (ExperimentalWarning, "no trials"); the
    rc context restores the style and the warnings stay inside.
    """
    import matplotlib

    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _plot_builders(study: optuna.Study, client: MlflowClient) -> dict[str, Callable[[], _FigurePair | None]]:
    """The plots of a study, by stable artifact name.

    Importances only from ``MIN_TRIALS_FOR_IMPORTANCE`` complete trials on, the lr x damping contour only when
    it can be drawn (``_contour_drawable``), the Pareto front only for several objectives.
    """
    from optuna.trial import TrialState

    builders: dict[str, Callable[[], _FigurePair | None]] = {
        "optimization_history": lambda: _optuna_pair("plot_optimization_history", study),
        "intermediate_values": lambda: _optuna_pair("plot_intermediate_values", study),
        "best_loss_curves": lambda: _curves_pair(_best_curves(study, client))}
    if len(study.directions) > 1:  # (metric, train_seconds): the trade-off export --pick chooses from
        builders["pareto_front"] = lambda: _optuna_pair("plot_pareto_front", study,
                                                        target_names=study.metric_names or None)
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= MIN_TRIALS_FOR_IMPORTANCE:
        builders["param_importances"] = lambda: _optuna_pair("plot_param_importances", study)
    if _contour_drawable(study):
        builders["lr_damping_contour"] = lambda: _optuna_pair("plot_contour", study, params=list(CONTOUR_PARAMS))
    return builders


def _contour_drawable(study: optuna.Study) -> bool:
    """Whether the complete trials that sampled both lr and damping hold two values of each: Optuna's contour of
    fewer logs ``Param lr unique value length is less than 2`` (K-FAC's lr is sampled only in fixed mode, so a
    study of automatic-mode trials and the one fixed default trial has a single lr) and draws nothing."""
    from optuna.trial import TrialState

    both = [t.params for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if all(name in t.params for name in CONTOUR_PARAMS)]
    return all(len({params[name] for params in both}) >= 2 for name in CONTOUR_PARAMS)


def _optuna_pair(function: str, study: optuna.Study, **kwargs: Any) -> _FigurePair | None:
    """The same optuna plot from its plotly and its matplotlib backend; ``None`` before any trial finished."""
    import optuna.visualization as plotly_plots
    import optuna.visualization.matplotlib as mpl_plots
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        return None
    plotly_fig = getattr(plotly_plots, function)(study, **kwargs)
    axes = getattr(mpl_plots, function)(study, **kwargs)
    mpl_fig = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
    return plotly_fig, mpl_fig


TrialCurves = dict[str, tuple[list[int], list[float]]]  # label -> (steps, values)


def _best_curves(study: optuna.Study, client: MlflowClient, count: int = BEST_CURVES) -> TrialCurves:
    """``eval_loss`` curves of the best complete trials, from their runs; Optuna's reports when a run has none."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    if len(study.directions) != 1:
        return {}
    reverse = study.direction == StudyDirection.MAXIMIZE
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = sorted((t for t in complete if t.value is not None), key=lambda t: t.value, reverse=reverse)[:count]
    curves: TrialCurves = {}
    for trial in best:
        label = f"trial-{trial.number} ({trial.value:.4g})"
        run_id = record.trial_run_id(trial)
        history = client.get_metric_history(run_id, CURVE_METRIC) if run_id else []
        if history:
            points = sorted((m.step, m.value) for m in history)
        else:
            points = sorted(trial.intermediate_values.items())
        curves[label] = ([step for step, _ in points], [value for _, value in points])
    return curves


def _curves_pair(curves: TrialCurves) -> _FigurePair | None:
    """Overlay of loss curves, log-scaled when every value is positive; ``None`` without curves."""
    if not curves:
        return None
    import plotly.graph_objects as go
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    values = [v for _, ys in curves.values() for v in ys if math.isfinite(v)]
    log_y = bool(values) and min(values) > 0
    title = f"{CURVE_METRIC} of the best {len(curves)} trials"

    plotly_fig = go.Figure([go.Scatter(x=xs, y=ys, mode="lines+markers", name=k) for k, (xs, ys) in curves.items()])
    plotly_fig.update_layout(title=title, xaxis_title="step", yaxis_title=CURVE_METRIC)
    if log_y:
        plotly_fig.update_yaxes(type="log")

    mpl_fig = Figure(figsize=(8, 5))
    axes = mpl_fig.add_subplot()
    for label, (xs, ys) in curves.items():
        axes.plot(xs, ys, marker=".", label=label)
    axes.set(title=title, xlabel="step", ylabel=CURVE_METRIC, yscale="log" if log_y else "linear")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend()
    return plotly_fig, mpl_fig
