"""One process per output folder: a second run or study on a folder in use is refused in one
line naming the holder, before it writes anything; `--overwrite` deletes only a run's own files.

T is the issue's small run: `train mnist_mlp --hidden-units 16 --epochs 2 --limit 300`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from bnn_keras import cli, files, study, training

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3",
           PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
T = ["train", "mnist_mlp", "--hidden-units", "16", "--epochs", "2", "--limit", "300", "--verbose", "0"]


def _cli(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err.strip()


def test_a_run_on_a_folder_held_by_another_process_is_refused_naming_it(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from bnn_keras import files\n"
         "with files.own_folder(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)", str(out)],
        env=ENV, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = _cli([*T, "--out", str(out)], capsys)
        assert code == 2
        assert err == (f"bnn-keras: error: output folder {str(out)!r} is in use by process {holder.pid}: "
                       "wait until it ends, or choose another folder")
        assert sorted(os.listdir(out)) == ["notes.txt"]
        code, err = _cli(["study", "--quick", "--tables", "clipping", "--out", str(out)], capsys)
        assert code == 2 and f"is in use by process {holder.pid}" in err
        assert sorted(os.listdir(out)) == ["notes.txt"]
    finally:
        holder.kill()
        holder.wait()
    with files.own_folder(out):  # a SIGKILLed holder leaves no lock behind
        pass
    assert sorted(os.listdir(out)) == ["notes.txt"]


@pytest.mark.parametrize("same", [True, False], ids=["identical-settings", "different-settings"])
def test_two_runs_started_together_on_one_folder_one_trains_the_other_is_refused(tmp_path, same):
    out = tmp_path / "run"
    second = [] if same else ["--batch-size", "30"]
    commands = [[sys.executable, "-m", "bnn_keras.cli", *T, "--out", str(out), *extra] for extra in ([], second)]
    processes = [subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    results = [(p.wait(timeout=300), p.stderr.read().strip()) for p in processes]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = [i for i, (code, _) in enumerate(results) if code == 0][0]
    refused = results[1 - winner][1]
    assert refused.startswith(f"bnn-keras: error: output folder {str(out)!r} is in use by process {processes[winner].pid}")
    assert len(refused.splitlines()) == 1
    summary = json.loads((out / "summary.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert summary["recipe"]["batch_size"] == (100 if winner == 0 or same else 30)
    assert [row["epoch"] for row in history] == [0, 1]
    assert sorted(os.listdir(out)) == ["best_model.keras", "curves.png", "history.csv", "history.json", "summary.json"]


def test_an_empty_output_path_is_refused_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "keep.txt").write_text("not a run's")
    for argv in ([*T, "--out", "", "--overwrite"], ["study", "--quick", "--out", ""]):
        code, err = _cli(argv, capsys)
        assert code == 2
        assert "is an empty path" in err and "--out" in err and len(err.splitlines()) == 1
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["backup", "backup/keep.txt"]


def test_overwrite_refuses_a_backup_folder_bnn_keras_did_not_write(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "backup" / "photos").mkdir(parents=True)
    (out / "backup" / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    (out / "summary.json").write_text("{}")
    code, err = _cli([*T, "--out", str(out), "--overwrite"], capsys)
    assert code == 2
    assert "holds a backup/ that bnn_keras did not write (it holds 'photos'" in err
    assert (out / "backup" / "photos" / "a.jpg").read_bytes() == b"\xff\xd8"
    assert (out / "summary.json").read_text() == "{}"


def test_a_refused_run_removes_the_folders_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    recipe = training.get_recipe("mnist_mlp").replace(output_dir=str(out), dataset="no_such_dataset_xyz", limit=10)
    with pytest.raises(ValueError):
        training.run(recipe)
    assert list(tmp_path.iterdir()) == []


def test_a_study_summary_that_is_not_a_summary_is_one_line_naming_the_file(tmp_path, capsys):
    base = study.quick(training.get_recipe("mnist_mlp")).replace(epochs=1, limit=100)
    (key, cell, seed, recipe), *_ = study.cell_recipes(tmp_path, base, [study.TABLES["clipping"]], [0])
    recipe.out.mkdir(parents=True)
    (recipe.out / "summary.json").write_text("[1, 2]")
    with pytest.raises(ValueError) as caught:
        study.run_study(tmp_path, base, tables=["clipping"], seeds=1, verbose=0)
    message = str(caught.value)
    assert message.startswith(f"{recipe.out / 'summary.json'} is not a run summary")
    assert "found a JSON list" in message and "\n" not in message


@pytest.mark.parametrize("command", [T, ["study", "--quick", "--tables", "clipping"]], ids=["train", "study"])
def test_an_output_folder_that_is_a_file_is_one_line(tmp_path, capsys, command):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    code, err = _cli([*command, "--out", str(target)], capsys)
    assert code == 2
    assert err == (f"bnn-keras: error: output folder {str(target)!r} is a file: "
                   "expected a folder or a path that does not exist yet")
    assert target.read_text() == "mine"
