"""Every way a study ends closes every run (real local Ray cluster, real sqlite MLflow store, tiny
synthetic dataset, the real `mg-ray tune` entry point in a subprocess).

After each ending: the study run is terminated, there is exactly one child run per trial, each
child is FINISHED / KILLED / FAILED with its `mg_ray.trial_state` tag, none is RUNNING, and no
Ray Train worker of the study is left. Covered here: trials stopped by ASHA across a SIGKILL in
a checkpoint-to-MLflow window and a resume, a failed trial, a study cut by its time budget (and
the same command run again), Ctrl-C and SIGTERM (and the same command run again, which
resumes), a second driver, a full disk and truncated checkpoints; and what the Optuna storage
holds after each. A completed study is in tests/e2e/test_study.py, a SIGKILLed pipeline in
tests/e2e/test_pipeline.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mg_ray.tune.trial_state import RUN_STATUS
from mg_ray.tune.watch import largest_checkpoint_mb
from tests.e2e.helpers import (
    cli_env,
    command,
    ending,
    epochs_logged,
    mlflow_client,
    no_train_workers_left,
    run,
    runs,
    start,
)

pytestmark = pytest.mark.slow

# One Train worker per trial, trials one after the other: what each test needs, at the least cost.
SPACE = """\
base: small
fixed:
  optim.epochs: {epochs}
  optim.milestones: [{epochs}]
  optim.warmup_epochs: 0
  resources.num_workers: 1
  resources.cpus_per_worker: 0.9
  resources.max_failures: 0
  data.test_clips: 1
{fixed}
study:
  num_trials: {trials}
  metric: {metric}
  mode: max
  seed: 0
  max_concurrent: 1
  trial_driver_cpus: 0.05
  register_as: endings-model
{study}
  asha: {{grace_period: 1, reduction_factor: 2}}
parameters:
  optim.lr: {{type: categorical, choices: [0.01, 0.015, 0.02, 0.03, 0.04, 0.05]}}
"""


def write_space(
    folder: Path,
    *,
    trials: int,
    epochs: int,
    metric: str = "val_top1",
    fixed: str = "",
    study: str = "",
) -> Path:
    path = folder / "space.yaml"
    path.write_text(
        SPACE.format(trials=trials, epochs=epochs, metric=metric, fixed=fixed, study=study)
    )
    return path


def optuna_study(home: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{home / 'optuna.db'}")


def study_tree(client, study: str):
    [parent] = runs(client, f"tags.`mg_ray.role` = 'study' and tags.`mg_ray.study` = '{study}'")
    children = runs(client, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, children


def check_closed(
    client, home: Path, study: str, trials: int, parent_status: str
) -> dict[str, object]:
    """The properties every ending must leave; returns the children by trial id."""
    parent, children = study_tree(client, study)
    assert parent.info.status == parent_status and parent.info.end_time
    assert len(children) == trials == len({c.data.tags["mg_ray.trial_id"] for c in children})
    for child in children:
        status, state = child.info.status, child.data.tags.get("mg_ray.trial_state")
        assert status in ("FINISHED", "KILLED", "FAILED") and child.info.end_time, (status, state)
        # a trial ASHA or the time budget stopped ended normally; an interrupted one was killed
        assert RUN_STATUS[state] == status, (status, state)
        assert state in ("completed", "stopped", "failed", "interrupted")
    assert no_train_workers_left(home)
    return {c.data.tags["mg_ray.trial_id"]: c for c in children}


# ASHA's decisions at its one rung (epoch 1; cutoff: the median of the rung's values) when the
# metric is the learning rate: the sixth trial's draws, tried in this order (`study.first_trials`).
LRS = [0.05, 0.02, 0.01, 0.015, 0.04, 0.03]
STOPPED = {0.02, 0.01, 0.015}  # below the median of those before them: .05, .035, .02
# A resumed ASHA that forgot the rungs would let 0.015 (the fourth) complete: it would be alone
# in its rung. (tests/tune/test_scheduling.py plays the same with ASHA alone.)


def lr_of(run) -> float:
    return float(run.data.params["optim.lr"])


def test_asha_killed_in_a_checkpoint_window_resumes_and_stops_the_same_trials(
    tiny_dataset, tmp_path
):
    """A 6-trial ASHA study, its driver SIGKILLed after 3 trials, in the moment between the
    fourth trial's first checkpoint and its reaching MLflow (and Tune). The same command resumes
    it: ASHA stops the trials an uninterrupted study stops, each trial has one MLflow run with
    every epoch Tune saw, and Optuna holds one trial per Tune trial, PRUNED or COMPLETE."""
    home = tmp_path / "home"
    first = ", ".join(f"{{optim.lr: {lr}}}" for lr in LRS)
    space = write_space(
        tmp_path,
        trials=len(LRS),
        epochs=2,
        metric="lr",
        study=f"  first_trials: [{first}]\n  standby_trials: 0",
    )
    args = ("tune", "--space", str(space), "--study", "asha", "--data", str(tiny_dataset))
    client = mlflow_client(home)
    log = tmp_path / "killed.log"
    proc = start(home, *args, log=log)
    with ending(proc):  # SIGKILLed once the fourth trial is in its window
        fourth = wait_for_checkpoint_window(client, home, proc, log, lr=LRS[3])
    # the epoch was in its checkpoint, not yet in MLflow, when the driver's processes died
    assert epochs_logged(client, fourth) == 0
    done = run(home, *args, timeout=900)
    out = done.stdout + done.stderr
    assert "resuming study 'asha'" in done.stdout, done.stdout[-3000:]
    assert "resumed from the checkpoint of epoch 0" in out, out[-3000:]

    children = check_closed(client, home, "asha", trials=len(LRS), parent_status="FINISHED")
    by_lr = {lr_of(c): c for c in children.values()}
    assert sorted(by_lr) == sorted(LRS)
    states = {lr: c.data.tags["mg_ray.trial_state"] for lr, c in by_lr.items()}
    assert states == {lr: "stopped" if lr in STOPPED else "completed" for lr in LRS}, states
    for lr in STOPPED:
        tags = by_lr[lr].data.tags
        assert tags["mg_ray.stop_reason"] == "asha" and tags["mg_ray.trial_epochs"] == "1", tags
    # every epoch Tune saw is in its run (a report racing ASHA's stop could add one: with the
    # controller polling every 0.2 s, the fourth's second epoch once reached MLflow before
    # Tune's stop reached the trial), and the epoch the kill caught between checkpoint and
    # MLflow is there once, in the same run
    assert by_lr[LRS[3]].info.run_id == fourth
    assert [m.step for m in client.get_metric_history(fourth, "epoch")].count(0) == 1
    for lr, child in by_lr.items():
        assert (1 if lr in STOPPED else 2) <= epochs_logged(client, child.info.run_id) <= 2

    # Optuna: one trial per Tune trial (none left RUNNING by the kill), pruned where ASHA stopped
    # it, every epoch an intermediate value; each names its Tune trial and MLflow run.
    study = optuna_study(home, "asha")
    assert study.metric_names == ["lr"]
    trials = {t.user_attrs["tune_trial_id"]: t for t in study.trials}
    assert len(study.trials) == len(trials) == len(LRS) and set(trials) == set(children)
    for tune_id, o in trials.items():
        lr = lr_of(children[tune_id])
        expected = ("PRUNED", {1: lr}) if lr in STOPPED else ("COMPLETE", {1: lr, 2: lr})
        assert (o.state.name, o.intermediate_values, o.value) == (*expected, lr), (tune_id, o)
        assert o.user_attrs["mlflow_run_id"] == children[tune_id].info.run_id


def wait_for_checkpoint_window(client, home: Path, proc, log: Path, lr: float) -> str:
    """Until Ray Train has recorded the first checkpoint of the trial that trains with `lr`;
    returns the trial's run id at once (the caller kills the driver then).

    Recorded, not only written: a restored Train run resumes from the checkpoint its controller's
    snapshot (`checkpoint_manager_snapshot.json`, Ray Train's own file in the run's folder)
    names, and the controller writes it before its report callbacks log the epoch into MLflow.
    The trial's folder is found through MLflow while the trial starts; from then on only that
    file is polled, tightly: on the tiny dataset an epoch takes under a second, and a poll that
    queried MLflow each time on a loaded machine missed the window."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        trials = (
            runs(client, "tags.`mg_ray.role` = 'trial'") if (home / "mlflow.db").exists() else []
        )
        [trial] = [t for t in trials if t.data.params.get("optim.lr") == str(lr)] or [None]
        if trial is not None:
            tune_id = trial.data.tags["mg_ray.trial_id"]
            folder = home / "ray_results" / "asha_train" / f"asha_{tune_id}"
            while time.monotonic() < deadline and proc.poll() is None:
                if recorded_checkpoint(folder):
                    return trial.info.run_id
                time.sleep(0.005)
        time.sleep(0.1)
    raise AssertionError("no checkpoint of the fourth trial:\n" + log.read_text()[-4000:])


def recorded_checkpoint(run_folder: Path) -> bool:
    """Ray Train's snapshot in `run_folder` names a latest checkpoint (read while Ray may be
    rewriting it: a partial file counts as none yet)."""
    try:
        snapshot = json.loads((run_folder / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(snapshot.get("latest_checkpoint_result"))


def test_two_studies_at_once_one_failed_and_one_cut_by_its_time_budget(tiny_dataset, tmp_path):
    """Two studies started at once on one machine, each driver with its own local Ray cluster:
    both end as they would alone. Each cluster's processes find its own State API: Ray Train's
    placement-group cleaner, which frees the CPUs of every trial ASHA stops, does not fail with
    `Found multiple active Ray instances` (`mg_ray.cluster.init_ray`).

    One study's only trial fails (every clip unreadable): Tune restarts it once, then it ends
    failed, in MLflow and in Optuna. The other is cut by its time budget: its trial ends stopped,
    PRUNED in Optuna with its last score, and the same command run again adds nothing."""
    (tmp_path / "failed").mkdir()
    data = tmp_path / "failed" / "broken"
    shutil.copytree(tiny_dataset, data)
    for video in (data / "videos").glob("*.mp4"):  # every clip unreadable, nothing to skip to
        video.write_bytes(video.read_bytes()[:200])
    failed_home = tmp_path / "failed" / "home"
    space = write_space(tmp_path / "failed", trials=1, epochs=2, fixed="  data.skip_bad: false")
    failed_log = tmp_path / "failed.log"
    failing = start(
        failed_home, "tune", "--space", str(space), "--study", "failed", "--data", str(data),
        log=failed_log,
    )  # fmt: skip
    with ending(failing):
        budget_study(tiny_dataset, tmp_path)
        assert failing.wait(timeout=600) == 0, failed_log.read_text()[-4000:]

    out = failed_log.read_text()
    assert "1 trials {'failed': 1}" in out, out[-3000:]
    assert "Found multiple active Ray instances" not in out, out[-3000:]
    # Tune restarted it once (`study.trial_max_failures`: what a lost node needs) before it failed
    assert "failed; Tune restarts it from its last checkpoint" in out, out[-3000:]
    client = mlflow_client(failed_home)
    [child] = check_closed(
        client, failed_home, "failed", trials=1, parent_status="FINISHED"
    ).values()
    assert child.data.tags["mg_ray.trial_state"] == "failed" and child.info.status == "FAILED"
    assert not client.search_registered_models()  # nothing completed: nothing registered
    [trial] = optuna_study(failed_home, "failed").trials
    assert trial.state.name == "FAIL" and trial.user_attrs["mlflow_run_id"] == child.info.run_id


def test_a_time_budget_that_ends_before_the_trial_starts_ends_it_stopped_everywhere(
    tiny_dataset, tmp_path
):
    """A 1 s budget ends the study while its only trial is still starting: Tune has drawn its
    config and Optuna holds it RUNNING, but its actor (which imports torch) is not up. The trial
    ends as one the budget cut before its first epoch: its run, with its config as parameters,
    FINISHED `stopped` by `time_budget` after 0 epochs, and PRUNED in Optuna with no value.
    (Before, Tune listed it TERMINATED, MLflow had no run for it and Optuna kept it RUNNING.)"""
    out, child = budget_study(tiny_dataset, tmp_path, budget_s=1)
    assert "cut by the time budget while it waited to start" in out, out[-3000:]
    assert child.data.tags["mg_ray.trial_epochs"] == "0" and child.data.params["optim.lr"]


def budget_study(tiny_dataset, tmp_path: Path, budget_s: float = 55) -> tuple[str, object]:
    """A study of one 200-epoch trial its time budget cuts, checked; its output and the trial's
    run."""
    folder = tmp_path / "budget"
    folder.mkdir()
    home = folder / "home"
    # The budget races the trial's first epoch, whose time depends on what else the two cores
    # run (the other study, another test): 55 s is usually enough for one or more epochs, but CI
    # has seen the budget end the trial before its first epoch reached Tune, at 40 s and at 55 s.
    # Both endings are normal ones, and each is checked below for what the stores must agree on.
    space = write_space(folder, trials=1, epochs=200, study=f"  time_budget_s: {budget_s}")
    args = (
        "tune",
        "--space",
        str(space),
        "--study",
        "budget",
        "--data",
        str(tiny_dataset),
        "--no-promote",
    )
    done = run(home, *args)
    assert "cut by the time budget" in done.stdout, done.stdout[-3000:]
    assert "Found multiple active Ray instances" not in done.stdout + done.stderr
    client = mlflow_client(home)
    [child] = check_closed(client, home, "budget", trials=1, parent_status="FINISHED").values()
    assert (
        child.data.tags["mg_ray.trial_state"] == "stopped"
        and child.data.tags["mg_ray.stop_reason"] == "time_budget"
    )
    # Its run counts every epoch it holds, the one that ended as the budget ran out included
    # (logged before Tune got it: the driver reads the run, not Tune); nothing after the run was
    # ended. Optuna holds the same epochs and has the trial pruned with the run's score.
    history = client.get_metric_history(child.info.run_id, "val_top1")
    seen = int(child.data.tags["mg_ray.trial_epochs"])
    assert seen == epochs_logged(client, child.info.run_id) and seen < 200
    assert all(m.timestamp <= child.info.end_time for m in history)
    [cut] = optuna_study(home, "budget").trials
    assert cut.state.name == "PRUNED" and sorted(cut.intermediate_values) == list(
        range(1, seen + 1)
    )
    if seen:
        scores = client.get_metric_history(child.info.run_id, "best_val_top1")
        assert cut.value == {m.step + 1: m.value for m in scores}[seen]
        assert cut.value == child.data.metrics["best_val_top1"]
    else:  # cut before its first epoch ended: no score anywhere
        assert cut.value is None

    again = run(home, *args)  # the same command: the study is over, nothing fails, nothing is added
    assert "study 'budget': completed before" in again.stdout, again.stdout[-3000:]
    check_closed(client, home, "budget", trials=1, parent_status="FINISHED")
    return done.stdout, child


def interrupt_after(
    proc, home: Path, log: Path, epochs: int, signum: int, group: bool, meanwhile=None
) -> int:
    """Send `signum` once the study's trial has `epochs` more epochs in MLflow than it had when
    `proc` started; the exit status. `meanwhile()` runs first, once the study holds its lock."""
    client = mlflow_client(home)
    before = logged_epochs(client, home)
    try:
        if meanwhile is not None:
            deadline = time.monotonic() + 120
            lock = home / "ray_results" / "stopped-by-signal.study-driver.json"
            while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            meanwhile()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if logged_epochs(client, home) >= before + epochs:
                break
            time.sleep(0.3)
        assert proc.poll() is None, "the study ended before the signal:\n" + log.read_text()[-4000:]
        if group:
            os.killpg(proc.pid, signum)  # what Ctrl-C in a terminal sends: the whole group
        else:
            proc.send_signal(signum)  # what `timeout`, systemd and Kubernetes send: the driver
        return proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def logged_epochs(client, home: Path) -> int:
    """The epochs the study's one trial has in MLflow (0 before the store or the trial exists)."""
    if not (home / "mlflow.db").exists():
        return 0
    trials = runs(client, "tags.`mg_ray.role` = 'trial'")
    return epochs_logged(client, trials[0].info.run_id) if trials else 0


def check_interrupted(client, home: Path, log: Path, first_run_id: str | None = None) -> str:
    assert "interrupted; run the same command to resume it" in log.read_text()
    [child] = check_closed(
        client, home, "stopped-by-signal", trials=1, parent_status="KILLED"
    ).values()
    assert child.data.tags["mg_ray.trial_state"] == "interrupted"
    assert "mg_ray.stop_reason" not in child.data.tags  # an interruption is not a stop
    assert first_run_id in (None, child.info.run_id)
    assert not client.search_registered_models()  # an interrupted study promotes nothing
    # Optuna: the one trial is still running, to be resumed (not failed, not drawn again), with
    # every epoch its run held when the driver ended it (the last one may have reached MLflow and
    # not Tune), and nothing MLflow lacks. (A Train controller that outlived the driver's wait for
    # it could log one more epoch after the run ended; the driver's copy comes after that end.)
    [trial] = optuna_study(home, "stopped-by-signal").trials
    assert trial.state.name == "RUNNING" and trial.user_attrs["mlflow_run_id"] == child.info.run_id
    scores = sorted(
        client.get_metric_history(child.info.run_id, "best_val_top1"), key=lambda m: m.timestamp
    )
    by_epoch = {m.step + 1: m.value for m in scores}
    held = {m.step + 1: by_epoch[m.step + 1] for m in scores if m.timestamp <= child.info.end_time}
    optuna_held = trial.intermediate_values
    assert held.items() <= optuna_held.items() <= by_epoch.items(), (optuna_held, by_epoch)
    # and the run counts the epochs it held then (read from it just before it was ended)
    assert int(child.data.tags["mg_ray.trial_epochs"]) == max(held, default=0), (child, held)
    return child.info.run_id


def test_ctrl_c_and_sigterm_interrupt_the_study_and_the_same_command_resumes_it(
    tiny_dataset, tmp_path
):
    """Ctrl-C (SIGINT to the process group), then SIGTERM to the driver alone (`timeout`,
    systemd, Kubernetes; `ray job stop` sends it to the driver and its children): each is an
    interruption (exit 130 / 143, the study run KILLED, its trial `interrupted`), and the same
    command resumes the trial where it was. A second driver of the running study is refused; a
    full disk (a small tmpfs, where this test may mount one) stops the study with one line and the
    same command resumes it once there is space; a truncated latest checkpoint is skipped on the
    last resume."""
    disk = small_disk(tmp_path / "disk")
    try:
        interrupt_resume_and_complete(tiny_dataset, tmp_path, disk)
    finally:
        if disk is not None:
            subprocess.run(["umount", "-l", str(disk)], check=False)


def small_disk(folder: Path) -> Path | None:
    """A 200 MB tmpfs at `folder`, or None where this user may not mount one."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(folder)],
        check=False,
        capture_output=True,
    )
    return folder if mounted.returncode == 0 else None


EPOCHS = 12


def interrupt_resume_and_complete(tiny_dataset, tmp_path: Path, disk: Path | None) -> None:
    home = (disk or tmp_path) / "home"
    # (12 epochs: an epoch takes under a second here, and each signal must find the trial training)
    space = write_space(tmp_path, trials=1, epochs=EPOCHS, study="  min_free_disk_mb: 50")
    args = (
        "tune",
        "--space",
        str(space),
        "--study",
        "stopped-by-signal",
        "--data",
        str(tiny_dataset),
    )
    client = mlflow_client(home)

    first = tmp_path / "first.log"
    proc = start(home, *args, log=first)

    def second_driver() -> None:  # refused at once, naming the running one; nothing is touched
        refused = subprocess.run(
            command(*args),
            check=False,
            env=cli_env(home),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        assert f"study 'stopped-by-signal' is already running: driver pid {proc.pid}" in (
            refused.stderr
        ), refused.stderr[-2000:]

    status = interrupt_after(proc, home, first, 1, signal.SIGINT, True, meanwhile=second_driver)
    assert status == 130, first.read_text()[-4000:]
    run_id = check_interrupted(client, home, first)

    second = tmp_path / "second.log"
    status = interrupt_after(start(home, *args, log=second), home, second, 2, signal.SIGTERM, False)
    assert status == 143, second.read_text()[-4000:]
    assert "resuming study 'stopped-by-signal'" in second.read_text()
    check_interrupted(client, home, second, run_id)

    if disk is not None:  # the disk fills up: one line naming it, exit 2
        # free space over study.min_free_disk_mb (50), but not for that plus one more checkpoint
        train_storage = home / "ray_results" / "stopped-by-signal_train"
        largest = largest_checkpoint_mb(train_storage)
        filler = disk / "filler"
        filler.write_bytes(b"\0" * int(shutil.disk_usage(disk).free - (50 + largest / 2) * 2**20))
        full = subprocess.run(
            command(*args),
            check=False,
            env=cli_env(home),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert full.returncode == 2, full.stdout[-3000:] + full.stderr[-3000:]
        assert f"{train_storage}: " in full.stderr, full.stderr[-3000:]
        assert (
            "MB free, under study.min_free_disk_mb (50) plus the largest checkpoint so far "
            f"({largest:.0f} MB); the study stops"
        ) in full.stderr, full.stderr[-3000:]
        [child] = check_closed(
            client, home, "stopped-by-signal", trials=1, parent_status="KILLED"
        ).values()
        assert child.data.tags["mg_ray.trial_state"] == "interrupted"
        assert not client.search_registered_models()
        filler.unlink()

    # The trial's checkpoints but its oldest are truncated (a disk that filled up, say): the
    # resume skips the one Ray Train holds as latest, with a warning naming it, and takes an
    # older one. (Which is latest is Ray Train's to say: a kill between writing a checkpoint and
    # registering it leaves a newer folder Ray Train never uses.) Ray Train keeps the best and
    # the latest, which are one checkpoint when the latest epoch is the best so far: that one is
    # truncated, and the resume skips it and trains from the start.
    checkpoints = sorted(
        (home / "ray_results" / "stopped-by-signal_train").glob("*/checkpoint_*/checkpoint.pt"),
        key=lambda f: f.parent.name,
    )
    newer = checkpoints[1:] or checkpoints
    for checkpoint in newer:
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])

    done = run(home, *args, timeout=900)
    out = done.stdout + done.stderr
    assert "resuming study 'stopped-by-signal'" in done.stdout, done.stdout[-3000:]
    assert any(f"skipping checkpoint {c.parent}" in out for c in newer), out[-3000:]
    [resumed] = check_closed(
        client, home, "stopped-by-signal", trials=1, parent_status="FINISHED"
    ).values()
    assert resumed.info.run_id == run_id and resumed.data.tags["mg_ray.trial_state"] == "completed"
    assert epochs_logged(client, resumed.info.run_id) == EPOCHS  # in the one run, each once
    [trial] = optuna_study(home, "stopped-by-signal").trials  # the same Optuna trial, completed
    assert trial.state.name == "COMPLETE"
    assert sorted(trial.intermediate_values) == list(range(1, EPOCHS + 1))
    assert trial.value == resumed.data.metrics["best_val_top1"]
    # every epoch's value is the one MLflow shows for it: an epoch trained again after the
    # skipped checkpoint holds its second value in both
    scores = client.get_metric_history(resumed.info.run_id, "best_val_top1")
    latest = {m.step + 1: m.value for m in sorted(scores, key=lambda m: m.timestamp)}
    assert trial.intermediate_values == latest, (trial.intermediate_values, scores)
    assert client.get_model_version_by_alias("endings-model", "champion")


def test_ray_processes_of_a_finished_study_are_gone(tmp_path):
    """The check the endings rely on sees a Ray Train worker while one lives."""
    from tests.e2e.helpers import ray_processes_of

    home = tmp_path / "home"
    # This interpreter itself, not "python" from PATH: a pyenv shim's helper processes carry the
    # same command line for a moment.
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)  # RayTrainWorker"],
        env={**os.environ, "MG_RAY_HOME": str(home)},
    )
    try:
        deadline = time.monotonic() + 10
        while [p.pid for p in ray_processes_of(home)] != [proc.pid] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p.pid for p in ray_processes_of(home)] == [proc.pid]
        assert ray_processes_of(tmp_path / "other") == []
    finally:
        proc.kill()
        proc.wait()
    assert no_train_workers_left(home, timeout_s=5)
