"""Faults inside a trial, through the real CLI, SQLite storage and training: the trial ends with its reason on
record and the study goes on to its budget.

In-process (CliRunner) on purpose: the fault models' module globals then show what happened to the memory and the
parameters of the faulty trial's model.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import fault_models
from tests.faults.conftest import fault_config, invoke, trials_of

pytestmark = pytest.mark.slow


def test_out_of_memory_mid_training_fails_the_trial_releases_it_and_the_next_trial_runs(in_tmp: Path) -> None:
    """torch.cuda.OutOfMemoryError on the 3rd forward of the first trial's model: FAIL with the reason, the
    model freed before the next trial builds its own, and the next trials complete."""
    config = fault_config(in_tmp, "oom_mlp", model_kwargs={"oom_build": 1, "oom_call": 3})
    result = invoke("search", str(config))
    assert result.exit_code == 0, result.output
    trials = trials_of(in_tmp)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    reason = trials[0].user_attrs["fail_reason"]
    assert reason.startswith("OutOfMemoryError: CUDA out of memory") and "injected" in reason
    assert fault_models.ALIVE_AT_BUILD[2] == [False, False], "the failed trial's model outlived it"
    assert "Traceback" not in result.output


def test_overflowing_activations_prune_the_trial_and_never_reach_the_parameters(
        in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the 5th forward on, the first trial's hidden activations overflow float32: NaN loss and gradients,
    inf statistics. K-FAC (empirical Fisher, so the update path is reached) skips the non-finite updates; the
    trial is PRUNED with the divergence as its reason and the study completes its budget. (A search silences
    K-FAC's warnings, so the skip is observed where K-FAC raises the damping for it.)"""
    from kfac_tune.optim.guards import Guards

    skips_seen: list[int] = []  # the guards' skip count each time the host raised λ for what they counted
    react = Guards.react

    def recorded(guards: Guards, group: dict, max_damping: float) -> None:
        before = group["damping"]
        react(guards, group, max_damping)
        if group["damping"] > before:
            skips_seen.append(int(guards.skipped))

    monkeypatch.setattr(Guards, "react", recorded)
    config = fault_config(in_tmp, "overflow_mlp", model_kwargs={"overflow_build": 1, "overflow_call": 5},
                          optimizer={"name": "kfac", "options": {"fisher": "empirical"}})
    result = invoke("search", str(config))
    assert result.exit_code == 0, result.output
    assert any(skips > 0 for skips in skips_seen), skips_seen
    trials = trials_of(in_tmp)
    assert [t.state.name for t in trials] == ["PRUNED", "COMPLETE"]  # pruned trials count towards the budget
    assert trials[0].user_attrs["prune_reason"].startswith("diverged: train_loss = nan")
    assert fault_models.NON_FINITE_PARAMETERS_SEEN == [], "a non-finite update reached the parameters"
    assert fault_models.ALIVE_AT_BUILD[2] == [False, False], "the pruned trial's model outlived it"


@pytest.mark.parametrize("where", ["build", "forward"])
def test_a_model_calling_sys_exit_in_a_trial_fails_that_trial(in_tmp: Path, where: str) -> None:
    """sys.exit() in the first trial's build or forward: Optuna lets SystemExit through, so the search exited 0
    at once, silently, the trial left RUNNING. Now the trial FAILs with the reason and the study goes on."""
    config = fault_config(in_tmp, "exiting_mlp", model_kwargs={"where": where, "exit_build": 1})
    result = invoke("search", str(config))
    assert result.exit_code == 0, result.output
    trials = trials_of(in_tmp)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[0].user_attrs["fail_reason"].startswith("UserExit: the model's code called sys.exit(0) during")


@pytest.mark.parametrize("where", ["build", "forward", "import"])
def test_a_model_calling_sys_exit_before_any_trial_is_exit_2_naming_the_callable(in_tmp: Path, where: str) -> None:
    """At import, or in the preflight's build or forward: exit 2, one paragraph naming model.callable."""
    if where == "import":
        (in_tmp / "exits_at_import.py").write_text("import sys\nsys.exit(0)\ndef make(**kwargs): pass\n")
        config = fault_config(in_tmp, model={"callable": "exits_at_import:make", "kwargs": {}})
    else:
        config = fault_config(in_tmp, "exiting_mlp", model_kwargs={"where": where, "exit_build": 0, "code": 3})
    result = invoke("search", str(config))
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert message.startswith("Error: ") and "model.callable" in message and "SystemExit" in message, message
    assert "Traceback" not in message and not (in_tmp / "study.db").exists()
