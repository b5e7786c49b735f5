"""One training run of the study's protocol: a `Recipe` (plain data) in, results out.

`run(recipe)` reads as the protocol: load the data (the last 10% of the training set
validates), build the model and the optimiser (an LR decaying once per epoch), set the
clipping schedule, `fit` every epoch without early stopping while `BestValidation`
keeps the best validation epoch (the study's rule 2), and report the test accuracy at
that epoch. Output, in ``recipe.output_dir``: ``history.csv`` / ``history.json`` (a row
per epoch, rewritten after each), ``best_model.keras`` (the best-validation weights, no
optimiser), ``summary.json`` (written last: it marks a finished run) and ``curves.png``.
With ``tensorboard`` ("scalars" or "histograms"), TensorBoard event files in
``tensorboard/<stage>/`` (`bnn_keras.callbacks.TensorBoardLog`; chief only): one
TensorBoard run per stage ("train", or "pretrain", ["activations",] "finetune"), stepped by the run's
epoch so the stages of one run line up; the epoch's history numbers, and the share of
binary weights that flipped sign, plus per-layer latent-weight histograms at "histograms".
A resumed run writes the epoch it redoes again (TensorBoard shows the last value);
``--overwrite`` removes the old logs.

Clipping schedules (``Recipe.schedule``, `SCHEDULES`):

- ``"clipped"``: clipping on from the first step (the study's end-to-end baseline);
  ``Recipe.clipping`` picks what is on: "both", "gradients" (clipped STE only),
  "weights" (weight clipping only) or "none" (the study's Table 3);
- ``"vanilla"``: vanilla STE and no weight clipping throughout;
- ``"vanilla-then-clipped"``: vanilla first, then clipped STE and weight clipping from
  ``switch_epoch`` on, or after ``patience`` epochs without a better validation
  accuracy; at the switch the LR is multiplied by ``lr_factor`` and the BN momentum
  set to ``switch_bn_momentum`` (the study's rules 3 and 5);
- ``"two-stage"``: train the float twin for ``pretrain_epochs``, copy its weights into
  the binary model (`bnn_keras.models.copy_weights`), fine-tune that for ``epochs``
  with clipping on (the study's Table 5), from ``lr_start * lr_factor`` and with
  ``switch_bn_momentum`` if given.
- ``"three-step"`` (BinaryNet variant): float for ``pretrain_epochs``, then binary
  activations with real weights (variant "binary-activations") for ``activation_epochs``,
  then fully binary for ``epochs`` (ReActNet's two steps after a float start); each
  stage starts from the last one's weights, with ``lr_start * lr_factor``.

In both staged schedules, ``distill`` (a temperature T) trains every stage after the
float one against the frozen float twin's softened outputs (`bnn_keras.distill`:
KL divergence at T, mixed with the label loss by ``distill_weight``); the history's
``loss`` stays the label loss and ``distill_loss`` is the KL term. ``weight_decay`` is
the decoupled (AdamW-style: w <- w - lr * decay * w beside the optimiser's
update) weight decay of the first stage (of every stage of a single-stage schedule),
``finetune_weight_decay`` that of the last, binary, stage; neither touches BN scales,
offsets and biases (`DECAY_EXCLUDED`). summary.json records each stage's value.

The dead zone (``dead_zone``, on by default): every epoch of a model with binary layers
adds ``dead_zone_saturated``, ``dead_zone_beyond``, ``dead_zone_inputs_beyond`` and
``dead_zone_flipped`` to its history row (`bnn_keras.dead_zone`: the shares of latent
weights at and beyond the clip value, of input pre-activations beyond it on the first
`DEAD_ZONE_SAMPLE` validation images, of signs flipped in the epoch), per layer in
TensorBoard as ``dead_zone/<metric>/<layer>``.

Long runs: a run stopped at any moment (even by SIGKILL) and started again with the same
recipe and folder continues after its last finished epoch, identically
(`bnn_keras.run_folder`); a NaN or infinite loss raises `TrainingDivergedError`; ``seed``
with ``deterministic`` gives identical histories; ``strategy`` picks a `tf.distribute`
strategy (per-replica batch, linearly scaled LR, synchronised BN, chief-only output);
``jit`` and ``steps_per_execution`` ("auto" by default) pick XLA and the execution
block for the model and device (`bnn_keras.speed`; the choice and its reason are printed
and kept in summary.json's ``speed``).

```python
from bnn_keras import training
recipe = training.RECIPES["mnist_mlp"].replace(
    epochs=5, model_kwargs={"hidden_units": (256, 256, 256)}, output_dir="runs/demo")
result = training.run(recipe)
result["test_accuracy_at_best"], result["best_epoch"]
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any

import numpy as np
import tensorflow as tf

from bnn_keras import callbacks as bk_callbacks
from bnn_keras import data as bk_data
from bnn_keras import dead_zone as bk_dead_zone
from bnn_keras import distribute as bk_distribute
from bnn_keras import models as bk_models
from bnn_keras import optimizers as bk_optimizers
from bnn_keras import plateau as bk_plateau
from bnn_keras import speed as bk_speed
from bnn_keras._switch import find_switchables
from bnn_keras.callbacks import TrainingDivergedError, _batch_norm_layers
from bnn_keras.constraints import SwitchableWeightClip
from bnn_keras.distill import DistillingModel
from bnn_keras.files import write_json, write_text
from bnn_keras.plateau import PlateauAction
from bnn_keras.quantizers import SwitchableSteSign
from bnn_keras.recipe import CLIPPINGS, FIELDS, LOSSES, LR_SCALINGS, LR_SCHEDULES, RECIPES, SCHEDULES, Recipe, get_recipe
from bnn_keras.run_folder import Backup, BestKeeper, PromoteBest, RunConflictError, RunFolder

__all__ = [
    "CLIPPINGS",
    "LOSSES",
    "LR_SCHEDULES",
    "LR_SCALINGS",
    "RECIPES",
    "Recipe",
    "RunConflictError",
    "SCHEDULES",
    "TrainingDivergedError",
    "get_recipe",
    "run",
    "set_clipping_parts",
    "write_json",
    "write_text",
]


def run(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    model: tf.keras.Model | None = None,
    unsafe_load: bool = False,
) -> dict[str, Any]:
    """Train `recipe` to the end (no early stopping) and write its results; return the summary.

    Your own model: `model` (a functional or Sequential Larq model), or a saved one in
    ``recipe.model_file``, is trained instead of the recipe's builder, made switchable
    first (`bnn_keras.make_switchable`: the original is not changed), with the recipe's
    optimiser, schedule, BN momentum, protocol, resume and output. Its input shape and
    class count are checked against the dataset first; a model ending in softmax gets the
    cross-entropy of probabilities. The model file is loaded as `bnn-keras export` loads
    one: a file carrying code (a Lambda layer) is refused unless `unsafe_load`.

    Returns the dict written to ``summary.json`` plus ``history`` (the per-epoch rows)
    and ``output_dir``. The reported numbers are those of the binary stage for
    "two-stage" (its ``best_epoch`` counts fine-tune epochs).

    If the output folder holds an unfinished run of the same recipe (``name``,
    ``output_dir``, ``verbose`` and ``tensorboard`` aside), it continues after that run's last finished
    epoch; if it holds the finished run, its summary is returned without training.
    `overwrite` replaces whatever run the folder holds.

    Raises:
        bnn_keras.data.DataUnavailableError: the dataset is not available offline
            (raised before anything is written).
        RunConflictError: the output folder holds a run of other settings (before
            anything is written).
        TrainingDivergedError: the loss became NaN or infinite; the last good backup
            and the best model so far stay in the output folder.
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"run expects a Recipe, got {type(recipe).__name__}")
    started = time.perf_counter()
    _check_folders(recipe)
    recipe, own = _own_model(recipe, model, unsafe_load)
    chief = recipe.strategy != "multi-worker" or bk_distribute.is_chief()
    folder = RunFolder(recipe.out)
    if not chief:  # never writes the folder; on a shared one it resumes from the chief's backup
        state = "finished" if (folder.out / "summary.json").exists() else "worker"
        if state == "finished":
            return _finished(recipe, folder, chief)
        return _start(recipe, folder, chief, state, started, own)
    with folder.lock():  # one run per folder: a second one is refused before anything is written
        state = folder.state(recipe, overwrite)
        if state == "finished":
            return _finished(recipe, folder, chief)
        return _start(recipe, folder, chief, state, started, own)


def _start(
    recipe: Recipe, folder: RunFolder, chief: bool, state: str, started: float, own: tf.keras.Model | None
) -> dict[str, Any]:
    strategy = _strategy(recipe.strategy)  # before any TensorFlow op: multi-worker sets up collectives first
    with _op_determinism(recipe.deterministic):
        return _train(_Run.start(recipe, strategy, folder, chief, own), state, started)


def _train(run_: "_Run", state: str, started: float) -> dict[str, Any]:
    """The protocol, once the data is loaded and the first model compiled: stages, then results."""
    recipe, folder = run_.recipe, run_.folder
    if run_.chief:
        folder.prepare(state)
    stages = _stages(recipe)
    finished_by_stage = _finished_by_stage(folder, stages)
    finished = finished_by_stage[-1]
    done = sum(finished_by_stage)
    run_.rows.extend(folder.history(done))
    resumed_at = _record_start(run_, state, done, finished)
    _announce(run_, done)
    if len(stages) > 1:
        model, extra = _staged(run_, stages, finished_by_stage)
        stage, offset, schedule = "finetune", sum(s.epochs for s in stages[:-1]), None
    else:
        model, extra = run_.first, {}
        set_clipping_parts(model, recipe.clipping if recipe.schedule == "clipped" else "none")
        stage, offset, schedule = "train", 0, _clipping_schedule(recipe, run_.rows)
    run_.first = None
    best = BestKeeper(run_.splits.test, folder if run_.chief else None)
    best.resume(run_.rows[offset:])
    run_.fit_stage(model, stage, recipe.epochs, finished, offset, [schedule] if schedule else [], best, len(stages) - 1)
    switched = schedule.switched_at_epoch if schedule else None
    summary = _summary(run_, model, best, switched, extra, resumed_at, started)
    if run_.chief:
        _write_results(run_, summary, switched, extra)
    else:
        folder.remove_empty_backup(remove_out=not run_.out_existed)
    return {**summary, "history": run_.rows, "output_dir": os.fspath(folder.out)}


@dataclasses.dataclass(frozen=True)
class _Stage:
    """One stage of a schedule: its name (in the history and the backup), model variant and epochs."""

    name: str
    variant: str
    epochs: int


def _stages(recipe: Recipe) -> list[_Stage]:
    """The schedule's stages in order; the last one is reported (best epoch, test accuracy)."""
    if recipe.schedule == "two-stage":
        return [_Stage("pretrain", "float", recipe.pretrain_epochs), _Stage("finetune", recipe.variant, recipe.epochs)]
    if recipe.schedule == "three-step":
        return [
            _Stage("pretrain", "float", recipe.pretrain_epochs),
            _Stage("activations", "binary-activations", recipe.activation_epochs),
            _Stage("finetune", recipe.variant, recipe.epochs),
        ]
    return [_Stage("train", recipe.variant, recipe.epochs)]


def _finished_by_stage(folder: RunFolder, stages: list[_Stage]) -> list[int]:
    """Each stage's finished epochs: every epoch of a stage a later stage has begun after."""
    finished: list[int] = []
    later_begun = False
    for stage in reversed(stages):
        count = stage.epochs if later_begun else folder.finished_epochs(stage.name)
        later_begun = later_begun or count > 0
        finished.insert(0, count)
    return finished


# --------------------------------------------------------------------------- the run's pieces


@dataclasses.dataclass
class _Run:
    """What every stage of one run shares: the recipe, strategy, data, folder and history rows."""

    recipe: Recipe
    strategy: tf.distribute.Strategy
    folder: RunFolder
    chief: bool
    plan: bk_distribute.ScalingPlan
    splits: bk_data.DatasetSplits
    first: tf.keras.Model | None  # the first stage's model, compiled before anything is written
    out_existed: bool
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    iterators: int = 0  # iterators of splits.train created in this process (see _skip_shuffles)
    own: tf.keras.Model | None = None  # the user's model (`run(model=...)`, ``model_file``)
    speed: bk_speed.SpeedPlan | None = None  # how the last compiled model runs (`bnn_keras.speed`)
    switched: dict[str, Any] | None = None  # what make_switchable did to it

    @classmethod
    def start(
        cls,
        recipe: Recipe,
        strategy: tf.distribute.Strategy,
        folder: RunFolder,
        chief: bool,
        own: tf.keras.Model | None = None,
    ) -> "_Run":
        """Seed, load the data, build and compile the first model: a bad setting fails before any write."""
        tf.keras.utils.set_random_seed(recipe.seed)  # before the pipelines: their shuffle seeds derive from it
        plan = bk_distribute.scaling_plan(strategy, recipe.batch_size, recipe.lr_start)
        splits = _load_data(recipe, plan.global_batch)
        if own is not None:
            _check_own_model(own, splits)
        run_ = cls(recipe, strategy, folder, chief, plan, splits, None, folder.out.exists(), own=own)
        first = _stages(recipe)[0]
        with strategy.scope():
            run_.first = run_.build(first.variant, recipe.bn_momentum)
            run_.compile(run_.first, first.epochs, plan.replicas, recipe.stage_weight_decay(first.name))
        return run_

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.splits.train_size / self.plan.global_batch)

    def build(self, variant: str, bn_momentum: float) -> tf.keras.Model:
        if self.own is not None:
            from bnn_keras.switchable import make_switchable

            model, report = make_switchable(self.own, report=True)
            self.switched = report.to_dict()
            for layer in _batch_norm_layers(model):
                layer.momentum = bn_momentum
            if self.recipe.verbose:
                print(f"bnn-keras: your model, made switchable: {report.summary()}", flush=True)
            return model
        return bk_models.get(self.recipe.model)(
            self.splits.input_shape,
            self.splits.num_classes,
            variant=variant,
            bn_momentum=bn_momentum,
            bn_epsilon=self.recipe.bn_epsilon,
            synchronized_bn=self.plan.replicas > 1,
            weight_binarisation=self.recipe.weight_binarisation,
            activation_binarisation=self.recipe.activation_binarisation,
            **self.recipe.model_kwargs,
        )

    def compile(self, model: tf.keras.Model, epochs: int, lr_scale: float, weight_decay: float = 0.0) -> None:
        recipe = self.recipe
        plan = bk_speed.choose(
            model,
            jit=recipe.jit,
            steps_per_execution=recipe.steps_per_execution,
            steps_per_epoch=self.steps_per_epoch,
            strategy=self.strategy,
            deterministic=recipe.deterministic,
        )
        if recipe.verbose and self.speed is not None and plan != self.speed:  # the first is announced
            print(f"bnn-keras: speed: {plan.describe()}", flush=True)
        self.speed = plan
        _compile(model, recipe, epochs, self.steps_per_epoch, lr_scale, not _ends_in_softmax(model), plan, weight_decay)

    def fit_stage(
        self,
        model: tf.keras.Model,
        stage: str,
        epochs: int,
        stage_finished: int,
        offset: int,
        schedule: list[tf.keras.callbacks.Callback],
        best: BestKeeper,
        prior_stages: int = 0,
    ) -> bool:
        """Fit one stage from its first unfinished epoch; False if it had finished every epoch."""
        if stage_finished >= epochs:
            return False
        before = offset + prior_stages  # iterators the stages before this one made: epochs + 1 each
        _skip_shuffles(self.splits.train, before + stage_finished - self.iterators)
        write = self.folder.write_history if self.chief else None
        plateau = self._plateau(stage)
        if plateau and plateau[0].action == "stop" and plateau[0].plateau is not None:
            return False  # stopped at its plateau before a restart: nothing more to train
        dead_zone = self._dead_zone(model)
        tensorboard = []
        if self.chief and self.recipe.tensorboard is not None:
            level = self.recipe.tensorboard
            tensorboard.append(bk_callbacks.TensorBoardLog(
                self.folder.tensorboard(stage), level == "histograms", offset, dead_zone[0] if dead_zone else None))
        backup = Backup(os.fspath(self.folder.stage_backup(stage)))
        promote = PromoteBest(self.folder, backup) if self.chief and best.folder is not None else None
        callbacks = [
            bk_callbacks.EpochClock(),
            bk_callbacks.StopOnNonFinite(offset, self.steps_per_epoch),
            *schedule,
            *([promote] if promote is not None else []),  # first writes of the epoch's end: a failed backup surfaces here
            best,
            *plateau,
            *dead_zone,
            bk_callbacks.HistoryRows(self.rows, stage, offset, write),
            *tensorboard,  # before the backup: an epoch a restart does not redo has its events written
            backup,
        ]
        try:
            try:
                model.fit(
                    self.splits.train,
                    validation_data=self.splits.validation,
                    epochs=epochs,
                    callbacks=callbacks,
                    verbose=self.recipe.verbose,
                )
            except BaseException:  # the backups started are finished and promoted; the error is the one to report
                with contextlib.suppress(Exception):
                    _settle(backup, promote)
                raise
            _settle(backup, promote)
        except TrainingDivergedError as error:
            raise TrainingDivergedError(f"{error}: training stopped; {self._kept()}") from None
        self.iterators = before + epochs + 1
        return True

    def _dead_zone(self, model: tf.keras.Model) -> list[tf.keras.callbacks.Callback]:
        """The dead-zone monitor on the first `DEAD_ZONE_SAMPLE` validation examples, where it can measure."""
        if not self.recipe.dead_zone or not bk_dead_zone.binary_layers(model):
            return []
        try:
            bk_dead_zone.DeadZoneProbe(model)
        except ValueError as error:
            if self.recipe.verbose:
                print(f"bnn-keras: no dead-zone columns: {error}", flush=True)
            return []
        images = next(iter(self.splits.validation))[0]
        return [bk_dead_zone.DeadZoneMonitor(images[:DEAD_ZONE_SAMPLE])]

    def _plateau(self, stage: str) -> list[PlateauAction]:
        """The last mile's callback (with the stage's finished epochs), on the last stage only.

        That is the stage the run reports and whose plateau summary.json records; the stages
        before it always run their configured epochs, so every stage boundary stays where
        `--pretrain-epochs` / `--activation-epochs` put it, for a resumed run as for a whole one.
        """
        if stage != _stages(self.recipe)[-1].name:
            return []
        recipe = self.recipe
        done = [row["val_accuracy"] for row in self.rows if row.get("stage") == stage]
        return [PlateauAction(recipe.plateau_action, _plateau_window(recipe), recipe.plateau_margin,
                              recipe.plateau_lr_factor, history=done, verbose=recipe.verbose)]

    def _kept(self) -> str:
        out = self.folder.out
        kept = f"{out} keeps the backup of the {len(self.rows)} finished epoch(s)" if self.rows else "no epoch had finished"
        if (out / "best_model.keras").exists():
            kept += " and the best model so far (best_model.keras)"
        return f"{kept}. Lower the learning rate and start afresh with --overwrite"


def _settle(backup: Backup, promote: PromoteBest | None) -> None:
    """When a stage's `fit` returns: its backups written, and the best model of the backed-up epochs promoted."""
    if promote is not None:
        promote.settle()  # it waits for the backups first
    else:
        backup.wait()


def _load_data(recipe: Recipe, global_batch: int) -> bk_data.DatasetSplits:
    splits = bk_data.load(
        recipe.dataset,
        data_dir=recipe.data_dir,
        raw_dir=recipe.raw_dir,
        batch_size=global_batch,
        validation_fraction=recipe.validation_fraction,
        seed=recipe.seed,
        targets="hinge" if recipe.loss == "squared_hinge" else "sparse",
        limit=recipe.limit,
    )
    if splits.validation_size < 1:
        raise ValueError(f"validation set is empty: {splits.train_size} training examples, limit {recipe.limit}")
    return _shard_by_data(splits) if recipe.strategy == "multi-worker" else splits


def _compile(
    model: tf.keras.Model,
    recipe: Recipe,
    epochs: int,
    steps_per_epoch: int,
    lr_scale: float,
    from_logits: bool = True,
    plan: bk_speed.SpeedPlan | None = None,
    weight_decay: float = 0.0,
) -> None:
    if recipe.lr_schedule == "exponential":
        learning_rate: Any = bk_optimizers.ExponentialDecayPerEpoch(
            recipe.lr_start * lr_scale, recipe.lr_end * lr_scale, epochs, steps_per_epoch
        )
    else:
        learning_rate = recipe.lr_start * lr_scale
    hyperparameters = dict(recipe.optimizer_kwargs)
    if weight_decay:
        hyperparameters["weight_decay"] = weight_decay
    optimizer = bk_optimizers.get(recipe.optimizer, learning_rate=learning_rate, **hyperparameters)
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_names=list(DECAY_EXCLUDED))
    if recipe.lr_scaling is not None:
        optimizer = bk_optimizers.LayerwiseLrScaling(optimizer, mode=recipe.lr_scaling)
    if recipe.loss == "squared_hinge":
        # argmax of +-1 targets is the class, so categorical accuracy is right for them.
        loss: Any = tf.keras.losses.SquaredHinge()
        accuracy: Any = tf.keras.metrics.CategoricalAccuracy(name="accuracy")
    else:
        loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
        accuracy = tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    plan = plan or bk_speed.choose(model, jit="off", steps_per_execution=1)
    model.compile(
        optimizer=optimizer,
        loss=loss,
        metrics=[accuracy],
        jit_compile=plan.jit_compile,
        steps_per_execution=plan.steps_per_execution,
    )


DEAD_ZONE_SAMPLE = 100
"""Validation examples the dead-zone shares of the inputs are measured on, each epoch."""

DECAY_EXCLUDED: tuple[str, ...] = ("gamma", "beta", "bias")
"""Variables weight decay leaves alone (a pattern in the name): BN scales and offsets, biases."""


def set_clipping_parts(model: tf.keras.Model, clipping: str) -> None:
    """Set each switchable of `model` for a clipped phase with `clipping` parts on.

    "gradients": every `SwitchableSteSign` clipped, every `SwitchableWeightClip` off;
    "weights": the reverse; "both" / "none": all on / all off.
    """
    FIELDS["clipping"].check("clipping", clipping)
    for switchable in find_switchables(model):
        if isinstance(switchable, SwitchableSteSign):
            switchable.set_clipping_enabled(clipping in ("gradients", "both"))
        elif isinstance(switchable, SwitchableWeightClip):
            switchable.set_clipping_enabled(clipping in ("weights", "both"))


def _clipping_schedule(recipe: Recipe, rows: list[dict[str, Any]]) -> bk_callbacks.ClippingSchedule | None:
    """The vanilla-then-clipped switch, with the plateau counter of the finished epochs replayed."""
    if recipe.schedule != "vanilla-then-clipped":
        return None
    schedule = bk_callbacks.ClippingSchedule(
        switch_epoch=recipe.switch_epoch,
        patience=recipe.patience,
        lr_factor=recipe.lr_factor,
        bn_momentum=recipe.switch_bn_momentum,
        verbose=int(recipe.verbose > 0),
    )
    schedule.replay(rows, recipe.epochs)
    return schedule


def _staged(run_: _Run, stages: list[_Stage], finished: list[int]) -> tuple[tf.keras.Model, dict[str, Any]]:
    """Fit every stage before the last (unless a later one has begun), each handing its weights on.

    The float twin (`run_.first`) is the first stage and, with ``distill``, the frozen teacher
    of every later one; returns the last stage's model, compiled, and the hand-over numbers.
    """
    recipe = run_.recipe
    momentum = recipe.bn_momentum if recipe.switch_bn_momentum is None else recipe.switch_bn_momentum
    teacher = run_.first if recipe.distill is not None else None
    models = [run_.first]
    with run_.strategy.scope():
        for stage in stages[1:]:
            model = run_.build(stage.variant, momentum)
            set_clipping_parts(model, recipe.clipping)
            if teacher is not None:
                model = DistillingModel(
                    model, teacher, recipe.distill, recipe.distill_weight, from_logits=not _ends_in_softmax(model)
                )
            run_.compile(model, stage.epochs, recipe.lr_factor * run_.plan.replicas, recipe.stage_weight_decay(stage.name))
            models.append(model)
    if teacher is not None and finished[1]:  # the float stage is not fitted again: its last weights teach
        run_.folder.restore(teacher, stages[0].name)
    info: dict[str, Any] = run_.folder.read_stage() if finished[1] else {}
    offset = 0
    for index, stage in enumerate(stages[:-1]):
        model, following = models[index], models[index + 1]
        if not finished[index + 1]:  # the next stage has not begun: this one ends and hands over
            best = BestKeeper(run_.splits.test, None)
            best.resume(run_.rows[offset:])
            if not run_.fit_stage(model, stage.name, stage.epochs, finished[index], offset, [], best, index):
                run_.folder.restore(model, stage.name)
            with run_.strategy.scope():
                bk_models.copy_weights(model, following)
            info.update(_hand_over_info(run_, following, stage, offset, last=index == len(stages) - 2))
            if run_.chief:
                run_.folder.write_stage(info)
        offset += stage.epochs
    boundaries = {stage.name: sum(s.epochs for s in stages[:i]) for i, stage in enumerate(stages) if i}
    return models[-1], {**info, "stage_boundary_epoch": offset, "stage_boundaries": boundaries}


def _hand_over_info(run_: _Run, model: tf.keras.Model, stage: _Stage, offset: int, last: bool) -> dict[str, Any]:
    """`stage`'s best epoch, and the accuracy of the next stage's model before it trains."""
    handed_val = model.evaluate(run_.splits.validation, verbose=0, return_dict=True)
    handed_test = model.evaluate(run_.splits.test, verbose=0, return_dict=True)
    best_epoch, best_row = _best_row(run_.rows[offset : offset + stage.epochs])
    into = "binarised" if last else "handed_over"
    return {
        f"{stage.name}_best_val_accuracy": best_row["val_accuracy"],
        f"{stage.name}_best_epoch": best_epoch,
        f"{stage.name}_test_accuracy_at_best": best_row.get("test_accuracy"),
        f"{into}_val_accuracy": handed_val["accuracy"],
        f"{into}_test_accuracy": handed_test["accuracy"],
    }


def _best_row(rows: list[dict[str, Any]], monitor: str = "val_accuracy") -> tuple[int, dict[str, Any]]:
    """The first row with the highest `monitor` (BestValidation's choice)."""
    index = max(range(len(rows)), key=lambda i: (rows[i][monitor], -i))
    return index, rows[index]


# --------------------------------------------------------------------------- results


def _summary(
    run_: _Run,
    model: tf.keras.Model,
    best: BestKeeper,
    switched: int | None,
    extra: dict[str, Any],
    resumed_at: list[int],
    started: float,
) -> dict[str, Any]:
    """What summary.json holds: the best-validation epoch's numbers first (the study's report)."""
    recipe, splits, last = run_.recipe, run_.splits, run_.rows[-1]
    return {
        "name": recipe.name,
        "best_val_accuracy": best.best,
        "best_epoch": best.best_epoch,
        "best_epoch_1based": best.best_epoch + 1,
        "test_accuracy_at_best": best.best_logs.get("test_accuracy"),
        "test_error_at_best": 1.0 - best.best_logs["test_accuracy"],
        "final_val_accuracy": last.get("val_accuracy"),
        "final_test_accuracy": last.get("test_accuracy"),
        "epochs": recipe.epochs,
        "total_epochs": len(run_.rows),
        "switched_at_epoch": switched,
        "plateau": _plateau_summary(run_.rows, recipe, best.best_epoch),
        "weight_decay": {stage.name: recipe.stage_weight_decay(stage.name) for stage in _stages(recipe)},
        "binarisation": {"weights": recipe.weight_binarisation, "activations": recipe.activation_binarisation},
        "distillation": None if recipe.distill is None else {"temperature": recipe.distill, "weight": recipe.distill_weight},
        **extra,
        **({"own_model": run_.switched} if run_.switched is not None else {}),
        "train_size": splits.train_size,
        "validation_size": splits.validation_size,
        "test_size": splits.test_size,
        "params": _param_counts(model),
        "distribution": {**dataclasses.asdict(run_.plan), "description": run_.plan.describe()},
        "speed": {**run_.speed.to_dict(), "description": run_.speed.describe()} if run_.speed else None,
        "resumed_at_epochs": resumed_at,
        "wall_time_s": time.perf_counter() - started,
        "recipe": recipe.to_dict(),
    }


def _plateau_window(recipe: Recipe) -> int:
    """The recipe's plateau window, or the default for its epoch budget."""
    return recipe.plateau_window or bk_plateau.default_window(recipe.epochs)


def _plateau_summary(rows: list[dict[str, Any]], recipe: Recipe, best_epoch: int) -> dict[str, Any] | None:
    """The last stage's plateau epoch (`bnn_keras.plateau`) beside its best epoch, and what was gained between them."""
    stage_rows = [row for row in rows if row.get("stage") == rows[-1].get("stage")]
    window = _plateau_window(recipe)
    values = [row["val_accuracy"] for row in stage_rows]
    epoch = bk_plateau.plateau_epoch(values, window, recipe.plateau_margin)
    if epoch is None:  # no validation accuracy
        return None
    at, best = stage_rows[epoch], stage_rows[best_epoch]
    return {
        "epoch": epoch,
        "epoch_1based": epoch + 1,
        "window": window,
        "margin": recipe.plateau_margin,
        "action": recipe.plateau_action,
        "val_accuracy": at["val_accuracy"],
        "test_accuracy": at.get("test_accuracy"),
        "val_gain_to_best": best["val_accuracy"] - max(values[: epoch + 1]),
        "test_gain_to_best": None if at.get("test_accuracy") is None else best.get("test_accuracy", math.nan) - at["test_accuracy"],
        "epochs_after": best_epoch - epoch,
    }


def _write_results(run_: _Run, summary: dict[str, Any], switched: int | None, extra: dict[str, Any]) -> None:
    """The curves, then summary.json (last: it marks the run finished), then drop the resume state."""
    from bnn_keras import plots  # matplotlib only when a run finishes

    recipe = run_.recipe
    marks = {}
    if switched is not None:
        marks[f"clipping on from epoch {switched + 1}"] = switched
    for stage, epoch in extra.get("stage_boundaries", {}).items():
        what = "binary activations" if stage == "activations" else "binarised"
        marks[f"{what} after epoch {epoch}"] = epoch
    what = f"{recipe.variant} {recipe.model}" if run_.own is None else f"{run_.own.name} (your model)"
    title = f"{recipe.name}: {what}, {recipe.schedule}"
    plots.plot_history(run_.rows, run_.folder.out / "curves.png", title=title, marks=marks)
    run_.folder.finish(summary)
    if recipe.verbose:
        print(
            f"bnn-keras: best val accuracy {summary['best_val_accuracy']:.4f} at epoch {summary['best_epoch_1based']}, "
            f"test accuracy there {summary['test_accuracy_at_best']:.4f} "
            f"(final {summary['final_test_accuracy']:.4f}); wrote {run_.folder.out}",
            flush=True,
        )


def _finished(recipe: Recipe, folder: RunFolder, chief: bool) -> dict[str, Any]:
    summary = folder.read_json("summary.json")
    rows = folder.read_json("history.json") if (folder.out / "history.json").exists() else []
    if chief:
        folder.remove_state()  # left behind if the finishing run was stopped after its summary
    if recipe.verbose:
        print(
            f"bnn-keras: {folder.out} holds this run, finished: nothing to train "
            "(--overwrite / overwrite=True trains it again)",
            flush=True,
        )
    return {**summary, "history": rows, "output_dir": os.fspath(folder.out)}


# --------------------------------------------------------------------------- your own model


def _own_model(recipe: Recipe, model: tf.keras.Model | None, unsafe_load: bool) -> tuple[Recipe, tf.keras.Model | None]:
    """The user's model (given, or loaded from ``model_file``) and the recipe with its fingerprint."""
    if model is None and recipe.model_file is None:
        return recipe, None
    if model is not None and recipe.model_file is not None:
        raise ValueError(f"run got a model and model_file {recipe.model_file!r}: expected one of them")
    if model is not None:
        if not isinstance(model, tf.keras.Model):
            raise TypeError(f"run expects model to be a Keras model, got {type(model).__name__}")
        digest = _model_digest(model)
    else:
        from bnn_keras.export.loading import load_model

        model = load_model(recipe.model_file, unsafe_load=unsafe_load)
        digest = _file_digest(recipe.model_file)
    if recipe.model_sha256 not in (None, digest):
        raise ValueError(
            f"model_sha256 {recipe.model_sha256} does not match the model given, whose sha256 is {digest}"
        )
    return recipe.replace(model_sha256=digest), model


def _file_digest(path: str) -> str:
    """sha256 of a model file, or of a SavedModel folder's files (names and contents, in order)."""
    import hashlib

    digest = hashlib.sha256()
    root = os.fspath(path)
    files = [root] if os.path.isfile(root) else sorted(
        os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names
    )
    for name in files:
        digest.update(os.path.relpath(name, root).encode())
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _model_digest(model: tf.keras.Model) -> str:
    """sha256 of a model's architecture (JSON) and weights: a resumed run must get the same model."""
    import hashlib

    digest = hashlib.sha256(model.to_json().encode())
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def _check_own_model(model: tf.keras.Model, splits: bk_data.DatasetSplits) -> None:
    """One line naming both when the model's input or class count does not fit the dataset."""
    try:
        inputs, outputs = model.input_shape, model.output_shape
    except (AttributeError, RuntimeError):
        raise ValueError(f"model {model.name!r} has no known input shape: build it on an input first") from None
    if isinstance(inputs, list) or isinstance(outputs, list):
        raise ValueError(f"model {model.name!r} has several inputs or outputs: expected one of each")
    expected = tuple(splits.input_shape)
    given = tuple(inputs[1:])
    if len(given) != len(expected) or any(g is not None and g != e for g, e in zip(given, expected)):
        raise ValueError(
            f"model {model.name!r} takes inputs of shape {given}, but dataset {splits.name!r} has {expected}"
        )
    if outputs[-1] != splits.num_classes:
        raise ValueError(
            f"model {model.name!r} has {outputs[-1]} outputs, but dataset {splits.name!r} has {splits.num_classes} classes"
        )


def _ends_in_softmax(model: tf.keras.Model) -> bool:
    """Whether the model's output is a softmax (probabilities, not logits)."""
    layer = model.layers[-1]
    while isinstance(layer, tf.keras.Model) and layer.layers:
        layer = layer.layers[-1]
    if isinstance(layer, tf.keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    return activation is tf.keras.activations.softmax or getattr(activation, "__name__", "") == "softmax"


# --------------------------------------------------------------------------- helpers


def _record_start(run_: _Run, state: str, done: int, finished: int) -> list[int]:
    """Record the start in run.json (chief only); return the epochs each restart resumed at."""
    if not run_.chief:
        return [done] if done else []
    resumed_at = run_.folder.record_start(run_.recipe, state, done)
    run_.folder.promote_best(finished)
    if state == "resume":
        run_.folder.write_history(run_.rows)
    return resumed_at


def _announce(run_: _Run, done: int) -> None:
    recipe, splits = run_.recipe, run_.splits
    if not recipe.verbose:
        return
    total = sum(stage.epochs for stage in _stages(recipe))
    what = f"{recipe.variant} {recipe.model}" if run_.own is None else f"your model {run_.own.name!r}"
    print(
        f"bnn-keras: {recipe.name}: {what} on {splits.name} "
        f"({splits.train_size} train / {splits.validation_size} val / {splits.test_size} test), "
        f"schedule {recipe.schedule}, {recipe.epochs} epochs -> {run_.folder.out}",
        flush=True,
    )
    print(f"bnn-keras: {run_.plan.describe()}", flush=True)
    if run_.speed is not None:
        print(f"bnn-keras: speed: {run_.speed.describe()}", flush=True)
    if done:
        print(f"bnn-keras: resuming after epoch {done} of {total} (backup in {run_.folder.backup})", flush=True)


def _strategy(name: str) -> tf.distribute.Strategy:
    try:
        return bk_distribute.get_strategy(name)
    except Exception as error:  # the TPU resolver raises several kinds when there is none
        if name != "tpu":
            raise
        raise ValueError(
            f"strategy 'tpu' expects a TPU it can connect to, got none ({type(error).__name__}: "
            f"{' '.join(str(error).split())})"
        ) from None


def _check_folders(recipe: Recipe) -> None:
    for field, flag in (("output_dir", "--out"), ("data_dir", "--data-dir"), ("raw_dir", "--raw-dir")):
        if getattr(recipe, field) == "":
            raise ValueError(f"{field} ({flag}) is an empty path: expected a folder name (\"\" would mean the current folder)")
    for field, what in (("data_dir", "a TFDS data folder"), ("raw_dir", "a folder of original dataset files")):
        path = getattr(recipe, field)
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{field} {path!r} is a file: expected {what}")


def _param_counts(model: tf.keras.Model) -> dict[str, int]:
    count = lambda weights: int(sum(np.prod(w.shape) for w in weights))  # noqa: E731
    return {"trainable": count(model.trainable_weights), "non_trainable": count(model.non_trainable_weights)}


def _skip_shuffles(dataset: tf.data.Dataset, count: int) -> None:
    """Create and drop `count` iterators of `dataset`.

    A seeded ``shuffle(reshuffle_each_iteration=True)`` draws the next epoch's order
    whenever an iterator is created, starting over in a new process; `fit` creates one
    iterator before its first epoch and one per epoch. Skipping the iterators an
    uninterrupted run would have made gives a resumed run the same orders.
    """
    for _ in range(max(count, 0)):
        iter(dataset)


def _shard_by_data(splits: bk_data.DatasetSplits) -> bk_data.DatasetSplits:
    """Multi-worker: each worker reads the whole, identically shuffled set and keeps its part of every global batch."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataclasses.replace(
        splits,
        train=splits.train.with_options(options),
        validation=splits.validation.with_options(options),
        test=splits.test.with_options(options),
    )


@contextlib.contextmanager
def _op_determinism(enabled: bool):
    """TensorFlow's op determinism on inside the block (off again after, if it was off)."""
    from tensorflow.python.framework import config as tf_config  # the only getter and switch-off

    switch = enabled and not tf_config.is_op_determinism_enabled()
    if switch:
        tf.config.experimental.enable_op_determinism()
    try:
        yield
    finally:
        if switch:
            tf_config.disable_op_determinism()
