"""Faults of the environment end in one line: a full disk, an unwritable folder, Ctrl-C while
starting, a damaged backup. Exit status 2 (130 for Ctrl-C), never a traceback; after a full
disk the same command continues the run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
KILLED_RUN = os.path.join(HERE, "helpers", "killed_run.py")
ENV = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3",
           PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
T = ["train", "mnist_mlp", "--hidden-units", "16", "--epochs", "2", "--limit", "300", "--verbose", "0"]


def _bnn_keras(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "bnn_keras.cli", *argv], env=ENV, capture_output=True, text=True, timeout=timeout)


def test_a_full_disk_during_training_is_one_line_and_the_same_command_continues(tmp_path, tmpfs):
    out = tmpfs("100k") / "run"
    failed = _bnn_keras(*T, "--out", str(out))
    assert failed.returncode == 2, failed.stderr[-2000:]
    line, = failed.stderr.strip().splitlines()
    assert line.startswith(f"bnn-keras: error: no space left on device writing in '{out}/")
    assert line.endswith("free some space; the same command then continues after the last finished epoch")
    shutil.copytree(out, tmp_path / "run")  # "free some space": the same run on a roomy disk
    finished = _bnn_keras(*T, "--out", str(tmp_path / "run"))
    assert finished.returncode == 0, finished.stderr[-2000:]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [0, 1]


@pytest.mark.parametrize("command", [T, ["study", "--quick", "--tables", "clipping"]], ids=["train", "study"])
def test_an_unwritable_output_folder_is_one_line(command):
    result = _bnn_keras(*command, "--out", "/proc/bnn_keras_test/run")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "bnn-keras: error: cannot create the output folder '/proc/bnn_keras_test/run' (No such file or directory): "
        "choose one you can write"
    )


def _default_sigint():
    """In the child: SIGINT as at a terminal (a background job's shell ignores it; a mask would block it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_while_starting_is_one_line_and_exit_130(tmp_path):
    # Ctrl-C from half a second on, every 0.3 s until the process ends: a library's bare
    # `except:` can swallow one interrupt during the imports, the next one must still stop it.
    process = subprocess.Popen([sys.executable, "-m", "bnn_keras.cli", *T, "--out", str(tmp_path / "run")],
                               env=ENV, stderr=subprocess.PIPE, text=True,
                               # a shell's background job ignores SIGINT, and so would the child: a terminal's Ctrl-C
                               preexec_fn=_default_sigint)
    time.sleep(0.5)
    while process.poll() is None:
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
    err = process.stderr.read()
    assert process.returncode == 130, err[-2000:]
    assert err in ("\nbnn-keras: interrupted while starting\n",
                   "\nbnn-keras: interrupted (the same command continues after the last finished epoch)\n")


def test_a_truncated_backup_checkpoint_is_one_line_naming_it(tmp_path):
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, KILLED_RUN, "backup:0", *T, "--out", str(out)],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    data, = (out / "backup" / "train" / "chief").glob("ckpt-*.data-*")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    result = _bnn_keras(*T, "--out", str(out))
    assert result.returncode == 2, result.stderr[-2000:]
    line, = result.stderr.strip().splitlines()
    assert line.startswith("bnn-keras: error: cannot read the backup") and str(out / "backup") in line
    assert "--overwrite" in line
