"""A seeded, time-bounded fuzz of the command line: random values for every flag of train,
study and export, and random bytes for every file argument.

Every case must end with exit status 0, 1, 2 or 130, at most one line on stderr (bnn_keras'
own: no traceback), and no file in the output folder unless the input was valid. A valid
case stops where training would start (`Model.fit` is replaced by a stop signal), so no
case trains: the fuzz is about what bnn_keras accepts, not about training.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import numpy as np
import pytest
import tensorflow as tf

from bnn_keras import cli

SEED = 20261201
BUDGET_S = {"train": 60.0, "study": 20.0, "export": 40.0}  # each command's share of the time
BASE = {
    "train": ["train", "mnist_mlp", "--hidden-units", "4", "--epochs", "1", "--limit", "40", "--verbose", "0"],
    "study": ["study", "--quick", "--tables", "clipping", "--seeds", "1", "--limit", "40", "--epochs", "1"],
}


class _WouldTrain(BaseException):
    """Raised instead of training: the input was accepted."""


def _values(rng: random.Random) -> list[str]:
    """One to three random command-line words: numbers of every size, text, flags, JSON."""
    pool = [
        lambda: str(rng.randint(-5, 5)), lambda: str(rng.randint(-(10**20), 10**20)), lambda: str(2**31),
        lambda: repr(rng.uniform(-3, 3)), lambda: rng.choice(["nan", "inf", "-inf", "-0", "1e308", "1e-320", "-1e3"]),
        lambda: "", lambda: " ", lambda: "-", lambda: "--", lambda: "--x", lambda: "=", lambda: "a=b",
        lambda: rng.choice(["[1,2]", "{}", "null", "true", "\"x\"", "{\"a\": 1}", "beta_1=-5", "learning_rate=0.5", "name=foo"]),
        lambda: "".join(rng.choice("abcxyz_-.=/0123456789 ") for _ in range(rng.randint(1, 12))),
        lambda: "".join(chr(rng.randint(0x80, 0x2FFF)) for _ in range(rng.randint(1, 5))),
        lambda: "x" * rng.randint(200, 2000),
    ]
    return [rng.choice(pool)() for _ in range(rng.choice([1, 1, 1, 2, 3]))]


def _random_file(rng: random.Random, folder, suffix: str) -> str:
    path = folder / f"fuzz{rng.randrange(10**9)}{suffix}"
    path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 16, 300, 5000]))))
    return str(path)


def _flags(command: str) -> list[argparse.Action]:
    parser = cli.build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return [a for a in sub._actions if not isinstance(a, argparse._HelpAction)]


def _case(rng: random.Random, command: str, action: argparse.Action, tmp_path, model_path: str) -> list[str]:
    """The base command with one flag (or positional) given random words or a random file."""
    out = str(tmp_path / "out" / f"c{rng.randrange(10**9)}")
    fileish = action.dest in ("data_dir", "raw_dir", "model_path", "verify_data") and rng.random() < 0.6
    words = [_random_file(rng, tmp_path, rng.choice([".npy", ".keras", ".h5", ".gz", ""]))] if fileish else _values(rng)
    if command == "export":
        argv = ["export", model_path, "--out", out + ".tflite", "--num-verify", "4"]
        if action.dest == "model_path":
            return ["export", *words, "--out", out + ".tflite"]
    else:
        argv = [*BASE[command], "--out", out]
        if action.dest == "recipe":
            return [argv[0], *words, *argv[2:]] if command == "train" else argv + ["--recipe", *words]
    if action.dest == "out":
        return argv[:-1] + words[:1] if command != "export" else argv[:3] + words[:1] + argv[4:]
    flag = action.option_strings[-1] if action.option_strings else None
    return argv + ([flag] if flag else []) + ([] if action.nargs == 0 and rng.random() < 0.7 else words)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((6,)), tf.keras.layers.Dense(3)])
    model.save(path)
    return str(path)


@pytest.mark.parametrize("command", ["train", "study", "export"])
def test_random_flag_values_and_file_bytes_end_in_one_line(command, tmp_path, model_path, capsys, monkeypatch):
    def would_train(*args, **kwargs):
        raise _WouldTrain

    monkeypatch.setattr(tf.keras.Model, "fit", would_train)
    monkeypatch.chdir(tmp_path)
    rng = random.Random(f"{SEED}-{command}")
    np.random.seed(0)
    actions = _flags(command)
    problems, ran, started = [], 0, time.perf_counter()
    while time.perf_counter() - started < BUDGET_S[command] or ran < 10:
        argv = _case(rng, command, rng.choice(actions), tmp_path, model_path)
        before = sorted(os.listdir(tmp_path / "out")) if (tmp_path / "out").exists() else []
        try:
            code = cli.main(argv)
        except _WouldTrain:
            code = "accepted"
        except BaseException as error:  # noqa: BLE001 - every escape is a finding
            code = f"raised {type(error).__name__}: {error}"
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        ran += 1
        after = sorted(os.listdir(tmp_path / "out")) if (tmp_path / "out").exists() else []
        if code not in ("accepted", 0, 1, 2, 130):
            problems.append((argv, f"exit {code}", err[-300:]))
        elif len(lines) > 1 or "Traceback" in err:
            problems.append((argv, f"{len(lines)} stderr lines", err[-300:]))
        elif code in (1, 2) and after != before:
            problems.append((argv, "wrote files", sorted(set(after) - set(before))))
    assert ran >= 10
    assert not problems, f"{len(problems)} of {ran} cases:\n" + "\n".join(map(repr, problems[:15]))
