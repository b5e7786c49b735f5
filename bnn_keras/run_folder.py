"""A training run's output folder: its state, the one definition of "same run", backups, best model.

A folder is *fresh* (nothing of a run in it), holds an unfinished run (*resume*: ``run.json``
and ``backup/`` are there, ``summary.json`` is not), a *finished* run (``summary.json``), or
a run of other settings (*conflict*, `RunConflictError`, unless overwritten). `same_settings`
is the definition of "the same run" that `bnn_keras.training.run` and `bnn_keras.study`
both use.

The best model is written in two steps so that it never holds an epoch a restart redoes:
each new best is saved as ``.pending-best_model-epoch<E>.keras``, and `promote_best`
renames the newest pending file of the finished epochs to ``best_model.keras`` once that
epoch's backup exists.

The backup is written in the background while the next epoch trains (`Backup`): the
epoch's state is copied in memory at its end, and `PromoteBest` promotes an epoch's best
model only once that backup is on disk, at the end of the next epoch or when `fit`
returns (`PromoteBest.settle`).

```python
folder = RunFolder("runs/x")
folder.state(recipe, overwrite=False)   # "fresh", "overwrite", "resume" or "finished"
```
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import larq as lq
import numpy as np
import tensorflow as tf

from bnn_keras import callbacks as bk_callbacks
from bnn_keras import files
from bnn_keras.recipe import Recipe

__all__ = ["Backup", "BestKeeper", "PromoteBest", "RESULTS", "RunConflictError", "RunFolder", "same_settings", "settings"]

BACKUP = "backup"
STAGES = ("train", "pretrain", "finetune")
"""The stages whose BackupAndRestore checkpoints live in ``backup/<stage>/``."""
RUN_FILE = "run.json"
STAGE_FILE = "stage.json"
RESULTS = ("summary.json", "history.json", "history.csv", "best_model.keras", "curves.png")
"""What a finished run leaves in its folder."""
TENSORBOARD = "tensorboard"
"""The folder of TensorBoard's event files, one subfolder per stage (``Recipe.tensorboard``)."""
_COSMETIC_FIELDS = ("name", "output_dir", "verbose", "tensorboard")  # logging only: a resumed run may change them
_PENDING_BEST = re.compile(r"\.pending-best_model-epoch(\d+)\.keras")
_ADVICE = "pass --overwrite (overwrite=True) to start afresh"


class RunConflictError(ValueError):
    """The output folder holds a run of other (or unknown) settings; `run(overwrite=True)` replaces it."""


def settings(recipe_dict: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two runs the same run: the recipe without name, folder, verbosity and TensorBoard logging.

    A recorded recipe is read back through `Recipe.from_dict` first (defaults filled in,
    lists and tuples alike), so both sides are compared in the same normal form.
    """
    plain = json.loads(json.dumps(files.jsonable(dict(recipe_dict))))
    with contextlib.suppress(TypeError, ValueError):
        plain = json.loads(json.dumps(Recipe.from_dict(plain).to_dict()))
    return {k: v for k, v in plain.items() if k not in _COSMETIC_FIELDS}


def same_settings(recorded: Mapping[str, Any], recipe: Recipe) -> bool:
    """Whether a recipe recorded in a folder (run.json / summary.json) is the same run as `recipe`."""
    return settings(recorded) == settings(recipe.to_dict())


class RunFolder:
    """The files of one run's output folder (the chief's view; other workers only read it)."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.backup = self.out / BACKUP

    # ----------------------------------------------------------------------- ownership

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Own the folder while the block runs (`files.own_folder`): a second run is refused."""
        return files.own_folder(self.out)

    # ----------------------------------------------------------------------- state

    def read_json(self, name: str) -> Any:
        return files.read_json(self.out / name, _ADVICE)

    def recorded_recipe(self) -> dict[str, Any] | None:
        """The settings of the run here: run.json's recipe, else summary.json's; None if neither."""
        for name in (RUN_FILE, "summary.json"):
            if (self.out / name).exists():
                content = self.read_json(name)
                recorded = content.get("recipe") if isinstance(content, Mapping) else None
                if isinstance(recorded, Mapping):
                    return dict(recorded)
        return None

    def state(self, recipe: Recipe, overwrite: bool) -> str:
        """What `run` finds here: "fresh", "overwrite", "resume" or "finished" (reads only).

        Raises RunConflictError when the folder holds a run of other settings and not `overwrite`.
        """
        out = self.out
        if out.exists() and not out.is_dir():
            raise ValueError(f"output folder {os.fspath(out)!r} is a file: expected a folder or a path that does not exist yet")
        found = [name for name in (RUN_FILE, *RESULTS, STAGE_FILE, BACKUP) if (out / name).exists()]
        if not found:
            return "fresh"
        if overwrite:
            stranger = self._foreign_backup_entry()
            if stranger is not None:
                raise RunConflictError(
                    f"output folder {os.fspath(out)!r} holds a {BACKUP}/ that bnn_keras did not write "
                    f"(it holds {stranger!r}; ours holds only {', '.join(STAGES)}): --overwrite deletes only a "
                    "run's own files, so move it away or choose another output folder"
                )
            return "overwrite"
        advice = "pass --overwrite (overwrite=True) to replace it, or choose another output folder"
        recorded = self.recorded_recipe()
        if recorded is None:
            raise RunConflictError(
                f"output folder {os.fspath(out)!r} holds {found[0]} of an earlier run but not its settings "
                f"({RUN_FILE}): {advice}"
            )
        then, now = settings(recorded), settings(recipe.to_dict())
        if then != now:
            differ = [k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
            shown = "; ".join(f"{k} {then.get(k)!r} there, {now.get(k)!r} now" for k in differ[:3])
            more = f"; {len(differ) - 3} more" if len(differ) > 3 else ""
            raise RunConflictError(f"output folder {os.fspath(out)!r} holds a run with other settings ({shown}{more}): {advice}")
        return "finished" if (out / "summary.json").exists() else "resume"

    def _foreign_backup_entry(self) -> str | None:
        """The first entry of ``backup/`` that is not a stage folder of ours (None: all ours, or none)."""
        if not self.backup.exists():
            return None
        if not self.backup.is_dir():
            return BACKUP
        for entry in sorted(self.backup.iterdir()):
            if entry.name not in STAGES or not entry.is_dir():
                return entry.name
        return None

    # ----------------------------------------------------------------------- preparing and recording

    def prepare(self, state: str) -> None:
        """Create the folder; for "overwrite" first remove every file a run writes here."""
        if state == "overwrite":
            self.remove_state()
            for name in RESULTS:
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(self.out / TENSORBOARD, ignore_errors=True)  # the old run's curves would mix in
        self.out.mkdir(parents=True, exist_ok=True)
        self.remove_temporaries()

    def record_start(self, recipe: Recipe, state: str, done: int) -> list[int]:
        """Write run.json (the recipe, and the epochs each restart resumed at); return the latter."""
        resumed = []
        if state == "resume" and (self.out / RUN_FILE).exists():
            resumed = list(self.read_json(RUN_FILE).get("resumed_at_epochs", []))
        if done:
            resumed.append(done)
        files.write_json(self.out / RUN_FILE, {"recipe": recipe.to_dict(), "resumed_at_epochs": resumed})
        return resumed

    def history(self, done: int) -> list[dict[str, Any]]:
        """The history rows of the first `done` epochs (rows past them belong to an epoch being redone)."""
        if not done:
            return []
        path = self.out / "history.json"
        recorded = self.read_json("history.json") if path.exists() else []
        if not isinstance(recorded, list) or len(recorded) < done:
            count = len(recorded) if isinstance(recorded, list) else "no"
            raise ValueError(f"{os.fspath(path)!r} holds {count} rows, the backup {done} finished epochs: {_ADVICE}")
        return [dict(row) for row in recorded[:done]]

    def write_history(self, rows: list[dict[str, Any]]) -> None:
        files.write_json(self.out / "history.json", rows)
        files.write_text(self.out / "history.csv", files.history_csv(rows))

    def write_stage(self, info: Mapping[str, Any]) -> None:
        files.write_json(self.out / STAGE_FILE, info)

    def read_stage(self) -> dict[str, Any]:
        return self.read_json(STAGE_FILE)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Write summary.json (its presence marks a finished run), then drop what only resuming needs."""
        files.write_json(self.out / "summary.json", summary)
        self.remove_state()

    # ----------------------------------------------------------------------- backups

    def stage_backup(self, stage: str) -> Path:
        return self.backup / stage

    def tensorboard(self, stage: str) -> Path:
        """Where `stage`'s TensorBoard events go: ``tensorboard/<stage>/`` (one TensorBoard run per stage)."""
        return self.out / TENSORBOARD / stage

    def finished_epochs(self, stage: str) -> int:
        """How many epochs the BackupAndRestore checkpoint of `stage` has finished (0 if none)."""
        latest = tf.train.latest_checkpoint(os.fspath(self.stage_backup(stage) / "chief"))
        if latest is None:
            return 0
        try:
            reader = tf.train.load_checkpoint(latest)
            for name in reader.get_variable_to_shape_map():  # every tensor: a truncated file fails here, not mid-fit
                reader.get_tensor(name)
            epoch = reader.get_tensor("ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE")
        except (tf.errors.OpError, ValueError, KeyError, IndexError, RuntimeError) as error:
            reason = " ".join(str(error).split())[:120]
            raise ValueError(f"cannot read the backup {latest!r} ({type(error).__name__}: {reason}): {_ADVICE}") from None
        return int(epoch) + 1

    def restore(self, model: tf.keras.Model, stage: str) -> None:
        """Load the model weights of `stage`'s checkpoint (a stage that finished every epoch)."""
        latest = tf.train.latest_checkpoint(os.fspath(self.stage_backup(stage) / "chief"))
        tf.train.Checkpoint(model=model).restore(latest).expect_partial()

    # ----------------------------------------------------------------------- best model

    def pending_best_path(self, epoch: int) -> Path:
        return self.out / f".pending-best_model-epoch{epoch}.keras"

    def promote_best(self, finished: int, keep_later: bool = False) -> None:
        """Make the newest pending best model of the first `finished` epochs best_model.keras; drop the rest.

        With `keep_later` (mid-run, while later epochs' backups are still being written) the
        pending files of epochs >= `finished` stay for a later promotion.
        """
        pending = {}
        for path in self.out.iterdir():
            match = _PENDING_BEST.fullmatch(path.name)
            if match:
                pending[int(match.group(1))] = path
        done = [epoch for epoch in pending if epoch < finished]
        if done:
            os.replace(pending.pop(max(done)), self.out / "best_model.keras")
        for epoch, path in pending.items():  # older bests, or bests of an epoch that did not finish
            if not (keep_later and epoch >= finished):
                path.unlink(missing_ok=True)

    # ----------------------------------------------------------------------- clean-up

    def remove_temporaries(self) -> None:
        """Remove what an atomic write killed mid-way left behind."""
        for path in self.out.iterdir():
            if files.TEMPORARY.fullmatch(path.name) and path.is_file():
                path.unlink(missing_ok=True)

    def remove_state(self) -> None:
        """Remove what only an unfinished run needs: run.json, stage.json, backups, pending files."""
        (self.out / RUN_FILE).unlink(missing_ok=True)
        (self.out / STAGE_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.backup, ignore_errors=True)
        self.promote_best(0)
        self.remove_temporaries()

    def remove_empty_backup(self, remove_out: bool) -> None:
        """Remove ``backup/`` (and the folder if `remove_out`) as far as empty: a worker's leftovers."""
        if self.backup.is_dir():
            for path, _, _ in sorted(os.walk(self.backup), key=lambda entry: -len(entry[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(path)
        if remove_out:
            with contextlib.suppress(OSError):
                self.out.rmdir()


def save_model(model: tf.keras.Model, weights: list[np.ndarray], path: Path) -> None:
    """Save `model`'s architecture with `weights`, without optimiser state, atomically.

    The copy has plain (unsynchronised) BatchNormalization and is built in a helper
    thread: strategy scopes are thread-local, so under a multi-worker strategy only the
    chief builds and saves it, without collective ops the other workers would have to join.
    """

    def clone_layer(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
        config = layer.get_config()
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            config["synchronized"] = False
        return layer.__class__.from_config(config)

    def save() -> None:
        uncompiled = tf.keras.models.clone_model(model, clone_function=clone_layer)
        uncompiled.set_weights(weights)
        files.write_atomically(path, lambda temporary: uncompiled.save(temporary))

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(save).result()


class BestKeeper(bk_callbacks.BestValidation):
    """`BestValidation` that survives a restart and saves each new best as a pending file.

    Its state is rebuilt from the finished epochs' history rows (`resume`); each new best's
    weights go to the folder's pending file for that epoch, which `PromoteBest` turns into
    ``best_model.keras`` once the epoch's backup is written. With `folder` None (the
    float stage of two-stage, a non-chief worker) nothing is saved.
    """

    def __init__(self, test_data: Any, folder: RunFolder | None):
        super().__init__(test_data=test_data)
        self.folder = folder

    def resume(self, rows: list[Mapping[str, Any]]) -> None:
        """Take the best of `rows` (this stage's finished epochs, in order) as the best so far."""
        for epoch, row in enumerate(rows):
            current = row.get(self.monitor)
            if current is not None and (self.best_epoch is None or self._better(float(current), self.best, 0.0)):
                self.best, self.best_epoch, self.best_logs = float(current), epoch, dict(row)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        super().on_epoch_end(epoch, logs)
        if self.folder is not None and self.best_epoch == epoch:
            save_model(self.model, self.best_weights, self.folder.pending_best_path(epoch))


_ASYNC = tf.train.CheckpointOptions(enable_async=True)


def _copy_quantized_variable_to_cpu(self: lq.quantized_variable.QuantizedVariable, object_map: Any) -> None:
    """Larq's QuantizedVariable checkpoints as its latent variable, so its host copy is the latent one's."""
    self.latent_variable._copy_trackable_to_cpu(object_map)
    object_map[self] = object_map[self.latent_variable]


def _async_support() -> None:
    """Teach larq's QuantizedVariable TensorFlow's asynchronous checkpointing (larq 0.14 lacks it)."""
    variable = lq.quantized_variable.QuantizedVariable
    if variable._copy_trackable_to_cpu is tf.__internal__.tracking.Trackable._copy_trackable_to_cpu:
        variable._copy_trackable_to_cpu = _copy_quantized_variable_to_cpu


def not_copyable(root: Any) -> list[str]:
    """What under `root` TensorFlow's asynchronous checkpointing could not copy (it would skip it).

    A saved object (one that serialises tensors) whose class has no host copy of its own.
    """
    base = tf.__internal__.tracking.Trackable
    names = []
    for node in tf.train.TrackableView(root).descendants():
        kind = type(node)
        saved = (kind._serialize_to_tensors is not base._serialize_to_tensors
                 or kind._gather_saveables_for_checkpoint is not base._gather_saveables_for_checkpoint)
        if saved and kind._copy_trackable_to_cpu is base._copy_trackable_to_cpu:
            names.append(f"{kind.__name__} {getattr(node, 'name', '')}".strip())
    return names


class Backup(tf.keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` whose epoch checkpoint is written while the next epoch trains.

    Without a tf.distribute strategy the checkpoint (weights, optimiser state, epoch) is
    copied in memory at the epoch's end and written by TensorFlow's asynchronous
    checkpointing; the checkpoint index names it only once it is complete, so a run killed
    mid-write resumes from the epoch before, as it would if killed just before the write.
    Under a strategy (its variables are distributed), or with any saved object the
    asynchronous copy would skip (`not_copyable`: a custom variable type), it writes
    synchronously, as BackupAndRestore does (`background` says which). `issued` counts the
    epochs whose backup has started; `wait` returns once every one is on disk.
    """

    def __init__(self, backup_dir: str):
        super().__init__(backup_dir, delete_checkpoint=False)
        self.issued = 0
        self.background = False
        self._checkpoint: tf.train.Checkpoint | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        _async_support()
        self._checkpoint = self._training_state.write_checkpoint_manager._checkpoint
        self.background = self.model._distribution_strategy is None and not not_copyable(self._checkpoint)

    def _backup(self, epoch: int, batch: int = 0) -> None:
        if self.background:
            self._training_state.write_checkpoint_manager.save(options=_ASYNC)
        else:
            super()._backup(epoch, batch)
        self.issued = epoch + 1

    def wait(self) -> None:
        """Return once the backups started so far are written; a write that failed raises its error here."""
        if self._checkpoint is None:
            return
        self._checkpoint.sync()
        writer = getattr(self._checkpoint, "_async_checkpointer_impl", None)
        error = getattr(writer, "_async_error", None)  # TensorFlow keeps the writer thread's error for its next save
        if error is not None:
            writer._async_error = None
            raise error

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.wait()
        super().on_train_end(logs)
        self.model._training_state = None  # BackupAndRestore deletes it, and a later `fit` of the model reads it


class PromoteBest(tf.keras.callbacks.Callback):
    """Turn the pending best model of the epochs whose backups are written into best_model.keras.

    It goes before the `BestKeeper` and `backup` in the callback list: at the end of epoch E
    it waits for the backups of epochs < E (started an epoch ago, written by now; a write
    that failed raises here, before anything else is written) and promotes among their
    pending best models; epoch E's own turn comes at the end of epoch E + 1 or in `settle`
    (called when `fit` returns, normally or not).
    """

    def __init__(self, folder: RunFolder, backup: Backup):
        super().__init__()
        self.folder = folder
        self.backup = backup

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.settle()  # epoch `epoch`'s own backup has not started yet: this waits for the ones before

    def settle(self) -> None:
        """Wait for the backups started so far; promote the best model of the backed-up epochs."""
        self.backup.wait()
        self.folder.promote_best(self.backup.issued, keep_later=True)
