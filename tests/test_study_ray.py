"""The study on Ray (``--executor ray``): the tables of a sequential run, a killed worker costs at
most an epoch, a killed driver's study resumes, a failing run is recorded, no Ray is one line.

Ray binds the loopback interface only (one local instance for the module, 2 CPUs); every run
is tiny (200 examples, a 16-unit MLP, 2 epochs)."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

# Before Ray is imported: its node address is then the loopback one (its default on Linux is the
# address other machines reach), so nothing listens beyond 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

from bnn_keras import cli, study  # noqa: E402

BASE = study.quick().replace(limit=200, epochs=2, batch_size=50, model_kwargs={"hidden_units": (16,)})
SEEDS = [0, 1]
_BN = study.TABLES["bn_momentum"]
BN = study.Table(key=_BN.key, title=_BN.title, cells={m: _BN.cells[m] for m in ("0.85", "0.99")}, paper=_BN.paper)
# bn_momentum's 0.85 cell and this adam cell both have the base settings: trained once per seed, copied once.
TABLES = [BN, study.optimizers_table({"adam": BASE.lr_start})]
WALL = {"epoch_time_s", "wall_time_s"}  # the only numbers a resumed run may change
RUN_ONLY = {"wall_time_s", "resumed_at_epochs", "recipe", "output_dir", "name"}  # summary fields of one run's place and time
TIMEOUT = 150


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance on 127.0.0.1 with 2 CPUs; yields its address for other drivers."""
    context = ray.init(
        address="local", include_dashboard=False, num_cpus=2, _node_ip_address="127.0.0.1",
        log_to_driver=False, logging_level="warning",
    )
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The grid trained here, one run after another: the reference."""
    out = tmp_path_factory.mktemp("sequential")
    return out, study.run_study(out, BASE, tables=TABLES, seeds=SEEDS, verbose=0)


def _history(out, name):
    with open(out / name / "history.json") as file:
        return [{k: v for k, v in row.items() if k not in WALL} for row in json.load(file)]


def _summary(out, name):
    with open(out / name / "summary.json") as file:
        return {k: v for k, v in json.load(file).items() if k not in RUN_ONLY}


def _names(result):
    return [f"{key}/{cell}/seed{s}" for key, cells in result["tables"].items() for cell in cells for s in SEEDS]


def test_ray_gives_the_tables_of_a_sequential_run(cluster, sequential, tmp_path, capsys):
    reference_out, reference = sequential
    assert (reference["trained"], reference["copied"]) == (4, 2)
    result = study.run_study(tmp_path, BASE, tables=TABLES, seeds=SEEDS, executor="ray")
    assert (result["trained"], result["copied"], result["skipped"], result["failed"]) == (4, 2, 0, 0)
    assert (tmp_path / "tables.md").read_text() == result["markdown"] == reference["markdown"]
    for name in _names(reference):  # every number of every run, not only the rounded table
        assert _history(tmp_path, name) == _history(reference_out, name), name
        assert _summary(tmp_path, name) == _summary(reference_out, name), name
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if line.startswith("study [")]
    assert len(progress) == 6 and sorted(int(line[7:].split("/")[0]) for line in progress) == list(range(1, 7))
    assert sum(line.endswith(" s") and ", 2 epochs in " in line and ": trained, test error " in line for line in progress) == 4
    assert sum(": copied, test error " in line for line in progress) == 2
    assert lines[-1] == f"study: 4 trained, 0 already done, 2 copied; wrote {tmp_path / 'tables.md'}"
    for key in ("bn_momentum", "optimizers"):
        assert (tmp_path / f"{key}.png").read_bytes()[:4] == b"\x89PNG"


def _killing(marker, victim):
    """A `train` that SIGKILLs its Ray worker once, right after `victim`'s first epoch's backup."""

    def train(recipe):
        from bnn_keras import run_folder, training

        if recipe.name != victim or os.path.exists(marker):
            return training.run(recipe)
        promote = run_folder.PromoteBest.on_epoch_end  # runs after BackupAndRestore's checkpoint

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0 and not os.path.exists(marker):
                with open(marker, "w") as file:
                    file.write(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            promote(self, epoch, logs)

        run_folder.PromoteBest.on_epoch_end = on_epoch_end
        try:
            return training.run(recipe)
        finally:
            run_folder.PromoteBest.on_epoch_end = promote

    return train


def test_a_killed_worker_is_retried_and_resumes_after_its_last_epoch(cluster, sequential, tmp_path):
    reference_out, _ = sequential
    marker, victim = tmp_path / "killed", "bn_momentum/0.99/seed0"
    result = study.run_study(
        tmp_path / "study", BASE, tables=[BN], seeds=[0], executor="ray", verbose=0, train=_killing(str(marker), victim),
    )
    assert marker.exists()  # the worker did die
    assert int(marker.read_text()) != os.getpid()
    assert (result["trained"], result["failed"]) == (2, 0)
    resumed = json.loads((tmp_path / "study" / victim / "summary.json").read_text())
    assert resumed["resumed_at_epochs"] == [1]  # the retry started after the one finished epoch
    for name in ("bn_momentum/0.85/seed0", "bn_momentum/0.99/seed0"):
        assert _history(tmp_path / "study", name) == _history(reference_out, name), name
        assert _summary(tmp_path / "study", name) == _summary(reference_out, name), name


DRIVER = """
import json, os, sys
from bnn_keras import study
from bnn_keras.recipe import Recipe

PIDS = os.path.join(sys.argv[1], "pids")  # a value: it travels with train to the workers


def train(recipe):  # notes the worker's process id, then trains
    from bnn_keras import training
    with open(PIDS, "a") as file:
        file.write(f"{os.getpid()}\\n")
    return training.run(recipe)

base = Recipe.from_dict(json.loads(sys.argv[3]))
bn = study.TABLES["bn_momentum"]
table = study.Table(key=bn.key, title=bn.title, cells={m: bn.cells[m] for m in ("0.85", "0.99")})
study.run_study(sys.argv[1], base, tables=[table], seeds=[0, 1], executor="ray", ray_address=sys.argv[2], train=train)
"""


def _lines(stream, into):
    for line in stream:
        into.put(line)
    into.put(None)


def test_a_killed_driver_s_study_trains_only_what_is_missing(cluster, sequential, tmp_path):
    """A second driver joins the cluster, forwards its runs' epoch lines (--verbose 2), and is
    SIGKILLed after its first finished run; the same study again trains only the runs without a summary."""
    reference_out, _ = sequential
    out = tmp_path / "study"
    out.mkdir()
    recipe = json.dumps(BASE.replace(verbose=2).to_dict())
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(out), cluster, recipe], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(driver.stdout, lines), daemon=True).start()
    seen, finished, deadline = [], 0, time.monotonic() + TIMEOUT
    try:
        while finished < 1:
            line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
            assert line is not None, "".join(seen)[-3000:]
            seen.append(line)
            finished += line.startswith("study [")
    finally:
        driver.kill()
        driver.wait(timeout=30)
    assert any("Epoch 1/2" in line for line in seen), "".join(seen)[-3000:]  # the runs' own lines came through
    assert len((out / "pids").read_text().split()) >= 1
    calls = tmp_path / "calls"

    def counting(recipe):
        from bnn_keras import training

        with open(calls, "a") as file:
            file.write(recipe.name + "\n")
        return training.run(recipe)

    result = study.run_study(out, BASE, tables=[BN], seeds=SEEDS, executor="ray", verbose=0, train=counting)
    trained = calls.read_text().split()
    assert result["skipped"] >= 1 and result["failed"] == 0
    assert len(trained) == result["trained"] == 4 - result["skipped"] >= 1
    assert len(set(trained)) == len(trained)
    for name in [f"bn_momentum/{m}/seed{s}" for m in ("0.85", "0.99") for s in SEEDS]:
        assert _history(out, name) == _history(reference_out, name), name


BROKEN = study.Table(
    key="broken",
    title="a table with a cell that cannot train",
    cells={"fine": lambda base: {}, "tiny": lambda base: {"limit": 5}},  # 5 examples: no validation set
)


def test_a_run_that_raises_is_recorded_as_failed_and_the_others_finish(cluster, sequential, tmp_path, capsys):
    reference_out, _ = sequential
    result = study.run_study(tmp_path, BASE, tables=[BROKEN], seeds=SEEDS, executor="ray")
    assert (result["trained"], result["failed"]) == (2, 2)
    reason = "ValueError: validation set is empty: 5 training examples, limit 5"
    assert result["failures"] == {"broken/tiny/seed0": reason, "broken/tiny/seed1": reason}
    markdown = (tmp_path / "tables.md").read_text()
    assert markdown == result["markdown"]
    assert "| test error, this study (n=2) | " in markdown and " | failed |" in markdown
    assert "## Failed runs (2)" in markdown
    assert f"- `broken/tiny/seed0`: {reason}" in markdown and f"- `broken/tiny/seed1`: {reason}" in markdown
    for seed in SEEDS:  # the fine cell has the base settings: the sequential bn_momentum 0.85 run's numbers
        assert _history(tmp_path, f"broken/fine/seed{seed}") == _history(reference_out, f"bn_momentum/0.85/seed{seed}")
        assert not (tmp_path / "broken" / "tiny" / f"seed{seed}").exists()
    out = capsys.readouterr().out
    assert f"broken/tiny/seed0: failed: {reason}" in out
    assert "study: 2 trained, 0 already done, 0 copied, 2 failed (reasons in tables.md)" in out
    again = study.run_study(tmp_path, BASE, tables=[BROKEN], seeds=SEEDS, executor="ray", verbose=0)
    assert (again["skipped"], again["trained"], again["failed"]) == (2, 0, 2)  # only the failed ones are tried again


def test_the_command_line_fails_its_study_when_a_run_fails(cluster, tmp_path, capsys):
    argv = ["study", "--quick", "--tables", "bn_momentum", "--seeds", "1", "--limit", "5", "--epochs", "1",
            "--executor", "ray", "--out", str(tmp_path / "s")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"bnn-keras: error: 4 of 4 runs failed: their reasons are in {tmp_path / 's' / 'tables.md'}"


def test_executor_flags_reach_run_study(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_run_study(out, base, **options):
        seen.update(options)
        return {"trained": 0, "skipped": 0, "copied": 0, "failed": 0}

    monkeypatch.setattr(study, "run_study", fake_run_study)
    argv = ["study", "--quick", "--executor", "ray", "--ray-address", "10.0.0.1:6379", "--gpus-per-run", "0.5",
            "--cpus-per-run", "2", "--out", str(tmp_path / "s")]
    assert cli.main(argv) == 0
    assert {k: seen[k] for k in ("executor", "ray_address", "gpus_per_run", "cpus_per_run")} == {
        "executor": "ray", "ray_address": "10.0.0.1:6379", "gpus_per_run": 0.5, "cpus_per_run": 2.0}
    assert cli.main(["study", "--quick", "--out", str(tmp_path / "t")]) == 0
    assert seen["executor"] == "local" and seen["ray_address"] is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ray-address", "127.0.0.1:1"], "ray_address (--ray-address) is for executor 'ray' only: expected executor 'ray', got 'local'"),
        (["--executor", "ray", "--cpus-per-run", "0"], "argument --cpus-per-run: expected a number > 0, got 0"),
        (["--executor", "ray", "--gpus-per-run", "-1"], "argument --gpus-per-run: expected a number >= 0, got -1"),
        (["--executor", "ray", "--gpus-per-run", "1.5"], "gpus_per_run must be a fraction of one GPU or a whole number, got 1.5"),
        (["--executor", "dask"], "argument --executor: invalid choice: 'dask'"),
    ],
)
def test_bad_executor_flags_are_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "s"
    assert cli.main(["study", "--quick", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bnn-keras: error: ") and message in err, err
    assert not out.exists()


def test_without_ray_the_ray_executor_is_one_line_naming_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as where it is not installed
    out = tmp_path / "s"
    started = time.perf_counter()
    assert cli.main(["study", "--quick", "--executor", "ray", "--out", str(out)]) == 2
    assert time.perf_counter() - started < 1.0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("bnn-keras: error: ") and 'pip install "bnn-keras[ray]"' in captured.err
    assert not out.exists()
    with pytest.raises(ValueError, match=r'install it with pip install "bnn-keras\[ray\]"'):
        study.run_study(out, BASE, executor="ray")
    assert not out.exists()
    result = study.run_study(out, BASE, tables=[BROKEN], seeds=[0], verbose=0, train=_fake_run)  # local needs no Ray
    assert (result["trained"], result["failed"]) == (2, 0)


def _fake_run(recipe):
    from bnn_keras import files

    summary = {"best_val_accuracy": 0.9, "best_epoch": 0, "best_epoch_1based": 1, "test_accuracy_at_best": 0.8,
               "test_error_at_best": 0.2, "recipe": recipe.to_dict()}
    recipe.out.mkdir(parents=True)
    files.write_json(recipe.out / "history.json", [{"epoch": 0, "val_accuracy": 0.9}])
    files.write_json(recipe.out / "summary.json", summary)
    return summary
