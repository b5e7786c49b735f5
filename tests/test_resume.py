"""Resume: a run SIGKILLed at any point and started again with the same command ends exactly
like an uninterrupted one; another command refuses a used output folder unless --overwrite."""

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from bnn_keras import cli, data, run_folder, training

HERE = os.path.dirname(os.path.abspath(__file__))
KILLED_RUN = os.path.join(HERE, "helpers", "killed_run.py")
ENV = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3",
           PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
TIMEOUT = 180
FILES = {"best_model.keras", "curves.png", "history.csv", "history.json", "summary.json"}
WALL = {"epoch_time_s", "wall_time_s"}  # the only numbers allowed to differ

# 270 train / 30 validation / 300 test images, 6 steps per epoch; clipping from epoch 2 (0-based)
SWITCHED = ["train", "mnist_mlp", "--limit", "300", "--hidden-units", "16", "16", "--epochs", "4",
            "--batch-size", "50", "--schedule", "vanilla-then-clipped", "--switch-epoch", "2",
            "--lr-factor", "0.1", "--switch-bn-momentum", "0.5", "--verbose", "0"]
TWO_STAGE = ["train", "mnist_mlp", "--limit", "300", "--hidden-units", "16", "16", "--pretrain-epochs", "2",
             "--epochs", "2", "--batch-size", "50", "--schedule", "two-stage", "--switch-bn-momentum", "0.6",
             "--verbose", "0"]

# BinaryNet, float -> binary activations -> fully binary, distilled from the float twin, stochastic
# signs in training: the draws, the teacher and the dead-zone columns must resume too.
THREE_STEP = ["train", "mnist_mlp", "--limit", "300", "--hidden-units", "16", "--variant", "binarynet",
              "--schedule", "three-step", "--pretrain-epochs", "1", "--activation-epochs", "2", "--epochs", "2",
              "--batch-size", "50", "--distill", "2", "--distill-weight", "0.5", "--weight-binarisation", "stochastic",
              "--activation-binarisation", "stochastic", "--weight-decay", "5e-6", "--finetune-weight-decay", "0",
              "--verbose", "0"]

# Three-step with the plateau stop (window 1, margin 0.5: every stage's plateau is its first
# epoch): the stop acts on the reported stage only, so the binary-activations stage runs its 4
# epochs and its boundary stays put. Its validation accuracy drops at epoch 3 (below epoch 2's;
# seed 0), where the first kill lands: the restart must take that stage's best from history.json.
# Then mid-way through both fine-tune epochs; the second is the last (the plateau stop).
PLATEAU_THREE_STEP = ["train", "mnist_mlp", "--limit", "300", "--hidden-units", "16", "--variant", "binarynet",
                      "--schedule", "three-step", "--pretrain-epochs", "1", "--activation-epochs", "4", "--epochs", "3",
                      "--batch-size", "50", "--plateau-action", "stop", "--plateau-window", "1", "--plateau-margin", "0.5",
                      "--verbose", "0"]


def _command(argv, out, kill_at=None):
    prefix = [sys.executable, "-m", "bnn_keras.cli"] if kill_at is None else [sys.executable, KILLED_RUN, kill_at]
    return prefix + argv + ["--out", str(out)]


def _run(argv, out, kill_at=None):
    result = subprocess.run(_command(argv, out, kill_at), env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    expected = 0 if kill_at is None else -signal.SIGKILL
    assert result.returncode == expected, result.stderr[-2000:]


def _read(out, name):
    with open(out / name) as file:
        return json.load(file)


def _killed_then_finished(argv, out, kill_points):
    """Kill one run at each point in turn, then let it finish; return what each kill left."""
    seen = []
    for point in kill_points:
        _run(argv, out, point)
        seen.append({
            "files": set(os.listdir(out)),
            "rows": [r["epoch"] for r in _read(out, "history.json")] if (out / "history.json").exists() else [],
            "resumed_at": _read(out, "run.json")["resumed_at_epochs"],
        })
    _run(argv, out)
    return seen


# (command, kill points). SWITCHED: killed right after epoch 1's history row (before its
# backup), mid-epoch 3 (after batch 2 of 6, in the clipped phase), and right after the last
# epoch's backup (before its best model is promoted and the summary written).
# TWO_STAGE: mid-way through the first fine-tune epoch, so the restart resumes exactly at
# the stage boundary (the float model's last backup, the hand-over, the data order); then
# mid-way through the second, with one fine-tune epoch finished.
# THREE_STEP: mid-way through the second epoch of binary activations, then mid-way through the
# first fully binary epoch.
# BACKGROUND: killed right after the backups of epochs 1 and 3 started in the background, most
# likely before they were on disk; either way the restart ends like an uninterrupted run.
BACKGROUND = SWITCHED[:SWITCHED.index("--schedule")] + ["--verbose", "0"]
CASES = {"switched": (SWITCHED, ["history:1", "batch:3:2", "backup:3"]), "two_stage": (TWO_STAGE, ["batch:2:1", "batch:3:1"]),
         "background": (BACKGROUND, ["started:1", "started:3"]),
         "three_step": (THREE_STEP, ["batch:2:1", "batch:3:2"]),
         "plateau_three_step": (PLATEAU_THREE_STEP, ["batch:3:2", "batch:5:2", "batch:6:2"])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each case killed and resumed (subprocesses, side by side) and, meanwhile, run uninterrupted here."""
    folders = {case: (tmp_path_factory.mktemp(f"{case}_whole"), tmp_path_factory.mktemp(f"{case}_pieces")) for case in CASES}
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        chains = {case: pool.submit(_killed_then_finished, argv, folders[case][1], points)
                  for case, (argv, points) in CASES.items()}
        for case, (argv, _) in CASES.items():
            assert cli.main(argv + ["--out", str(folders[case][0])]) == 0
        return {case: (*folders[case], chains[case].result()) for case in CASES}


@pytest.fixture
def switched(runs):
    return runs["switched"]


@pytest.fixture
def two_stage(runs):
    return runs["two_stage"]


@pytest.fixture
def three_step(runs):
    return runs["three_step"]


def _without_wall_times(rows):
    return [{k: v for k, v in row.items() if k not in WALL} for row in rows]


def _assert_same_run(whole, pieces):
    assert _without_wall_times(_read(pieces, "history.json")) == _without_wall_times(_read(whole, "history.json"))
    summaries = [_read(out, "summary.json") for out in (whole, pieces)]
    for summary in summaries:
        summary.pop("wall_time_s"), summary.pop("resumed_at_epochs"), summary["recipe"].pop("output_dir")
    assert summaries[0] == summaries[1]
    models = [tf.keras.models.load_model(out / "best_model.keras", compile=False, safe_mode=True) for out in (whole, pieces)]
    for a, b in zip(*(m.get_weights() for m in models)):
        np.testing.assert_array_equal(a, b)
    assert set(os.listdir(pieces)) == FILES  # backups, run.json and pending files are gone


def test_killed_three_times_ends_exactly_like_an_uninterrupted_run(switched):
    whole, pieces, _ = switched
    _assert_same_run(whole, pieces)


def test_resumed_history_has_every_epoch_once_with_the_schedule_of_an_uninterrupted_run(switched):
    _, pieces, seen = switched
    rows = _read(pieces, "history.json")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert [r["clipping_phase"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    assert [r["bn_momentum"] for r in rows] == [0.85, 0.85, 0.5, 0.5]
    decay = (3e-6 / 1e-3) ** (1 / 3)  # exponential 1e-3 -> 3e-6 over 4 epochs, x0.1 from the switch on
    expected_lr = [1e-3, 1e-3 * decay, 1e-4 * decay**2, 1e-4 * decay**3]
    assert [r["lr"] for r in rows] == pytest.approx(expected_lr, rel=1e-5)
    summary = _read(pieces, "summary.json")
    assert summary["switched_at_epoch"] == 2
    assert summary["resumed_at_epochs"] == [1, 3, 4]


def test_each_kill_left_only_whole_files_and_the_finished_epochs(switched):
    whole, _, seen = switched
    after_history, mid_epoch, after_backup = seen
    improved = [row["best_epoch"] == row["epoch"] for row in _read(whole, "history.json")]
    assert improved[1] and improved[3]  # so the first and last kills leave a pending best model
    # epoch 1's row and best model were written, its backup not: the restart redoes epoch 1.
    # Epoch 0's best model was promoted at epoch 1's end, once epoch 0's background backup was on disk
    assert after_history["rows"] == [0, 1] and after_history["resumed_at"] == []
    assert ".pending-best_model-epoch1.keras" in after_history["files"]
    assert ".pending-best_model-epoch0.keras" not in after_history["files"]
    assert {"run.json", "backup", "best_model.keras", "history.json"} <= after_history["files"]
    # mid-epoch 3: epochs 0-2 finished (1 and 2 by the second start)
    assert mid_epoch["rows"] == [0, 1, 2] and mid_epoch["resumed_at"] == [1]
    # every epoch backed up, the last one's best model still pending: the restart only promotes it
    assert after_backup["rows"] == [0, 1, 2, 3] and after_backup["resumed_at"] == [1, 3]
    assert {".pending-best_model-epoch3.keras", "best_model.keras"} <= after_backup["files"]
    for state in seen:
        assert "summary.json" not in state["files"]
        assert not any(name.startswith((".history-", ".run-", ".best_model-")) for name in state["files"])


def test_a_kill_while_the_backup_is_written_in_the_background_resumes_exactly(runs):
    whole, pieces, seen = runs["background"]
    _assert_same_run(whole, pieces)
    summary = _read(pieces, "summary.json")
    assert summary["resumed_at_epochs"][0] in (1, 2)  # epoch 1 redone, or its backup was complete
    assert [state["rows"] for state in seen] == [[0, 1], [0, 1, 2, 3]]
    for state in seen:
        assert "summary.json" not in state["files"]


def test_two_stage_resumes_at_the_stage_boundary_exactly(two_stage):
    whole, pieces, seen = two_stage
    _assert_same_run(whole, pieces)
    rows = _read(pieces, "history.json")
    assert [(r["epoch"], r["stage"], r["stage_epoch"]) for r in rows] == [
        (0, "pretrain", 0), (1, "pretrain", 1), (2, "finetune", 0), (3, "finetune", 1)]
    assert [r["bn_momentum"] for r in rows] == [0.85, 0.85, 0.6, 0.6]
    assert _read(pieces, "summary.json")["resumed_at_epochs"] == [2, 3]
    assert seen[0]["rows"] == [0, 1] and "stage.json" in seen[0]["files"]  # killed in the fine-tune stage
    assert seen[1]["rows"] == [0, 1, 2]  # one fine-tune epoch finished


def test_three_step_with_distillation_and_stochastic_signs_resumes_exactly(three_step):
    whole, pieces, seen = three_step
    _assert_same_run(whole, pieces)
    rows = _read(pieces, "history.json")
    assert [(r["stage"], r["stage_epoch"]) for r in rows] == [
        ("pretrain", 0), ("activations", 0), ("activations", 1), ("finetune", 0), ("finetune", 1)]
    assert all(r["distill_loss"] > 0 for r in rows[1:]) and all("dead_zone_flipped" in r for r in rows[3:])
    assert _read(pieces, "summary.json")["resumed_at_epochs"] == [2, 3]
    assert seen[0]["rows"] == [0, 1] and seen[1]["rows"] == [0, 1, 2]


def test_the_plateau_stop_ends_the_reported_stage_only_and_a_killed_run_resumes_exactly(runs):
    whole, pieces, seen = runs["plateau_three_step"]
    _assert_same_run(whole, pieces)
    rows = _read(pieces, "history.json")
    assert [(r["epoch"], r["stage"], r["stage_epoch"]) for r in rows] == [
        (0, "pretrain", 0), *((1 + e, "activations", e) for e in range(4)), (5, "finetune", 0), (6, "finetune", 1)]
    activations = [r["val_accuracy"] for r in rows[1:5]]
    assert activations[2] <= max(activations[:2])  # the first kill's epoch is not a new best of its stage (nor is a tie)
    assert [r["best_epoch"] for r in rows[1:5]] == [float(_first_best(rows[1 : 2 + e])) for e in range(4)]
    summary = _read(pieces, "summary.json")
    assert summary["plateau"]["epoch"] == 0 and summary["total_epochs"] == 7
    assert summary["resumed_at_epochs"] == [3, 5, 6]
    assert [state["rows"] for state in seen] == [[0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]


# Validation accuracy peaks at epoch 1 of 4 (0.667, then 0.6 and 0.633; seed 0), the test
# accuracy there differs from the last epoch's; killed mid-epoch 3, so the restart must take the
# best of epochs 0-2 from history.json, and that best is not the last finished epoch.
EARLY_BEST = ["train", "mnist_mlp", "--limit", "300", "--hidden-units", "16", "16", "--epochs", "4",
              "--batch-size", "50", "--lr", "0.05", "--lr-end", "0.005", "--verbose", "0"]


@pytest.fixture(scope="module")
def early_best(tmp_path_factory):
    """Killed in a subprocess, then resumed here (one TensorFlow start fewer)."""
    out = tmp_path_factory.mktemp("early_best")
    _run(EARLY_BEST, out, "batch:3:2")
    killed_rows = [r["epoch"] for r in _read(out, "history.json")]
    assert cli.main(EARLY_BEST + ["--out", str(out)]) == 0
    return out, killed_rows


def _first_best(rows):
    """The first epoch with the highest val_accuracy, computed here from the history rows."""
    val = [row["val_accuracy"] for row in rows]
    return val.index(max(val))


def test_resumed_run_keeps_a_best_epoch_from_before_the_kill(early_best):
    out, killed_rows = early_best
    assert killed_rows == [0, 1, 2]  # the restart resumed after epoch 2, mid-epoch 3 redone
    rows = _read(out, "history.json")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    best = _first_best(rows)
    # the fixture can tell: the best is before the kill and is neither the last finished nor the last epoch
    assert best < 2 and rows[best]["val_accuracy"] > max(r["val_accuracy"] for r in rows[best + 1:])
    assert rows[best]["test_accuracy"] != rows[-1]["test_accuracy"]
    summary = _read(out, "summary.json")
    assert summary["resumed_at_epochs"] == [3]
    assert (summary["best_epoch"], summary["best_epoch_1based"]) == (best, best + 1)
    assert summary["best_val_accuracy"] == rows[best]["val_accuracy"]
    assert summary["test_accuracy_at_best"] == rows[best]["test_accuracy"]
    assert summary["final_test_accuracy"] == rows[-1]["test_accuracy"]
    assert [r["best_epoch"] for r in rows] == [float(_first_best(rows[: e + 1])) for e in range(4)]
    # best_model.keras holds that epoch's weights: its test accuracy, recomputed, is the row's
    model = tf.keras.models.load_model(out / "best_model.keras", compile=False)
    splits = data.load("embedded", limit=300, batch_size=50, targets="hinge")
    images, targets = (np.concatenate(part) for part in zip(*splits.test.as_numpy_iterator()))
    accuracy = np.mean(np.argmax(model.predict(images, verbose=0), axis=1) == np.argmax(targets, axis=1))
    assert accuracy == pytest.approx(rows[best]["test_accuracy"], abs=1e-6)


@pytest.mark.parametrize("finished, promoted", [(3, 1), (2, 1), (1, 0), (0, None)])
def test_promote_best_takes_the_newest_pending_best_of_the_finished_epochs_and_removes_the_rest(tmp_path, finished, promoted):
    folder = run_folder.RunFolder(tmp_path)
    for epoch in (0, 1, 5):  # bests found in epochs 0 and 1, and in epoch 5, which is not finished
        folder.pending_best_path(epoch).write_text(f"epoch {epoch}")
    folder.promote_best(finished)
    if promoted is None:
        assert os.listdir(tmp_path) == []
    else:
        assert os.listdir(tmp_path) == ["best_model.keras"]
        assert (tmp_path / "best_model.keras").read_text() == f"epoch {promoted}"


@pytest.mark.parametrize("val, best", [([0.5, 0.8, 0.6, 0.7], 1), ([0.9, 0.5, 0.6], 0), ([0.5, 0.8, 0.8, 0.7], 1)])
def test_best_keeper_resume_takes_the_best_finished_epoch_not_the_last(val, best):
    rows = [{"epoch": e, "val_accuracy": v, "test_accuracy": 0.1 * e} for e, v in enumerate(val)]
    keeper = run_folder.BestKeeper(None, None)
    keeper.resume(rows)
    assert (keeper.best_epoch, keeper.best) == (best, val[best])
    assert keeper.best_logs == rows[best]
    empty = run_folder.BestKeeper(None, None)
    empty.resume([])
    assert empty.best_epoch is None


def _snapshot(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_other_settings_are_refused_in_one_line_and_overwrite_starts_afresh(switched, tmp_path, capsys):
    _, pieces, _ = switched
    out = tmp_path / "run"
    shutil.copytree(pieces, out)
    before = _snapshot(out)
    other = SWITCHED[:SWITCHED.index("--epochs") + 1] + ["3"] + SWITCHED[SWITCHED.index("--epochs") + 2:]
    assert cli.main(other + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bnn-keras: error: output folder")
    assert "holds a run with other settings (epochs 4 there, 3 now)" in err and "--overwrite" in err
    assert _snapshot(out) == before  # nothing touched

    assert cli.main(SWITCHED + ["--out", str(out)]) == 0  # the same command: finished, nothing to train
    assert _snapshot(out) == before

    assert cli.main(other + ["--out", str(out), "--overwrite"]) == 0
    rows = _read(out, "history.json")
    assert [r["epoch"] for r in rows] == [0, 1, 2] and [r["clipping_phase"] for r in rows] == [0.0, 0.0, 1.0]
    summary = _read(out, "summary.json")
    assert summary["epochs"] == 3 and summary["resumed_at_epochs"] == []
    assert set(os.listdir(out)) == FILES


def test_a_folder_with_results_but_no_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "history.json").write_text("[]")
    assert cli.main(SWITCHED + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds history.json of an earlier run but not its settings (run.json)" in err and err.count("\n") == 1
    assert os.listdir(out) == ["history.json"]
