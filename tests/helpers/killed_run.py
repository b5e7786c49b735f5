"""Subprocess body: ``bnn-keras ARGV...`` that SIGKILLs itself at one chosen point (resume tests).

    python killed_run.py POINT ARGV...

POINT (epochs count over both stages of a two-stage run, all 0-based):

- ``batch:E:B``: after the execution block holding batch B of epoch E (batch B itself with
  ``steps_per_execution`` 1), before the epoch ends;
- ``history:E``: right after epoch E's history row is written, before its backup;
- ``backup:E``: right after epoch E's backup is on disk, before its best model is promoted.

Except for ``started``, each backup is on disk before the run goes on (a run writes it in
the background otherwise), so what a kill leaves is known;
- ``started:E``: right after epoch E's backup has started in the background, most likely
  before it is on disk (either way the restart must end like an uninterrupted run).
"""

import json
import os
import signal
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from bnn_keras import callbacks, cli, run_folder  # noqa: E402


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at(point: str) -> None:
    kind, *numbers = point.split(":")
    at = [int(n) for n in numbers]
    if kind != "started":
        original_write = run_folder.Backup._backup

        def write(self, epoch, batch=0):
            original_write(self, epoch, batch)
            self.wait()

        run_folder.Backup._backup = write
    if kind == "batch":
        original_batch = callbacks.StopOnNonFinite.on_train_batch_end

        def on_train_batch_end(self, batch, logs=None):
            first = self._done  # 0-based first batch of the block this hook ends (steps_per_execution)
            original_batch(self, batch, logs)
            if self.epoch_offset + self._epoch == at[0] and first <= at[1] <= batch:
                die()  # after the block holding batch at[1] (that batch itself when a block is one step)

        callbacks.StopOnNonFinite.on_train_batch_end = on_train_batch_end
    elif kind == "history":
        original_history = callbacks.HistoryRows.on_epoch_end

        def on_epoch_end(self, epoch, logs=None):
            original_history(self, epoch, logs)
            if [self.epoch_offset + epoch] == at:
                die()

        callbacks.HistoryRows.on_epoch_end = on_epoch_end
    elif kind in ("backup", "started"):
        original_backup = run_folder.Backup._backup

        def _backup(self, epoch, batch=0):
            original_backup(self, epoch, batch)
            with open(os.path.join(os.path.dirname(os.path.dirname(self.backup_dir)), "history.json")) as file:
                if [json.load(file)[-1]["epoch"]] == at:  # the row of the epoch being backed up
                    die()

        run_folder.Backup._backup = _backup
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    kill_at(sys.argv[1])
    sys.exit(cli.main(sys.argv[2:]))
