"""``bnn-keras``: train a study recipe, run the study's ablation grid, export a model.

```
bnn-keras train mnist_mlp --epochs 10 --hidden-units 512 512 512 --out runs/quickstart
bnn-keras study --quick --out runs/study
bnn-keras export ...
```

Argument parsing only: the flags become a `bnn_keras.training.Recipe` (which validates
them) and the work is done by `training.run`, `study.run_study` and `export.run_export`.
A bad flag or value ends in one line, ``bnn-keras: error: ...``, exit status 2, and
nothing written; a run whose loss becomes NaN or infinite ends in one such line with
exit status 1.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from bnn_keras._keras_setup import explicit_verbose

__all__ = ["build_parser", "main"]

PROG = "bnn-keras"


class UsageError(Exception):
    """A command-line mistake: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage block) and never exit mid-parse."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# --------------------------------------------------------------------------- value types


def _typed(rule: Any) -> Callable[[str], Any]:
    """An argparse ``type`` from a field rule of `bnn_keras.recipe` (named for argparse's messages)."""
    parse = rule.parse

    def typed(text: str) -> Any:
        return parse(text)

    typed.__name__ = rule.expected.replace(" or None", "")
    return typed


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


# --------------------------------------------------------------------------- arguments

# (group, flag, help, extra argparse arguments); type and choices come from the field rules.
_RECIPE_FLAGS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("data", "--dataset", "'embedded' (packaged Fashion-MNIST subset), mnist, fashion_mnist, cifar10 or another TFDS image dataset", {}),
    ("data", "--data-dir", "TFDS data directory holding the prepared dataset", {"metavar": "DIR"}),
    ("data", "--raw-dir", "folder with the original files (e.g. /usr/share/datasets/fashion-mnist), prepared into --data-dir once", {"metavar": "DIR"}),
    ("data", "--limit", "use only the first N training and N test examples", {"metavar": "N"}),
    ("model", "--model", "network (default: the recipe's)", {}),
    ("model", "--variant", "float, binaryconnect (binary weights), binarynet (binary weights and activations) or binary-activations (real weights)", {}),
    ("model", "--hidden-units", "mlp: units of each hidden layer (study: 2048 2048 2048)", {"nargs": "+", "metavar": "N"}),
    ("model", "--width-multiplier", "vgg10, resnet18: multiply every width by F", {"metavar": "F"}),
    ("model", "--block-order", "vgg10: conv -> pool -> BN -> act (paper, the study's) or conv -> BN -> act -> pool (conventional)", {}),
    ("model", "--weight-clip", "weight-clip range: [-1, 1], BinaryConnect's per-layer Glorot range, or no weight-clip constraint", {}),
    ("model", "--real-input", "binarynet: keep the network's input real-valued (default: binarised)", {"dest": "binarize_input", "action": "store_false"}),
    ("model", "--bn-momentum", "BatchNormalization moving-average momentum, in [0, 1) (study: 0.85 MLP, 0.9 CNN)", {"metavar": "M"}),
    ("model", "--loss", "squared_hinge on +-1 targets (study) or crossentropy", {}),
    ("optimiser", "--optimizer", "optimiser (study: adam)", {}),
    ("optimiser", "--opt", "extra optimiser hyperparameter, repeatable (e.g. --opt beta_2=0.99)", {"dest": "optimizer_kwargs", "type": _key_value, "action": "append", "metavar": "KEY=VALUE"}),
    ("optimiser", "--lr", "learning rate of the first epoch (> 0)", {"dest": "lr_start", "metavar": "LR"}),
    ("optimiser", "--lr-end", "learning rate of the last epoch, exponential schedule (> 0)", {"metavar": "LR"}),
    ("optimiser", "--lr-schedule", "exponential per-epoch decay --lr -> --lr-end (study), or constant --lr", {}),
    ("optimiser", "--lr-scaling", "BinaryConnect's Glorot per-layer LR scaling, on the update or on the gradient, or none", {}),
    ("optimiser", "--epochs", "epochs to train (>= 1; the binary fine-tuning epochs for two-stage)", {"metavar": "N"}),
    ("optimiser", "--batch-size", "examples per batch", {"metavar": "N"}),
    ("clipping schedule", "--schedule", "clipped from the start, vanilla STE throughout, vanilla then clipped, float pretraining then binary fine-tuning, or float then binary activations then fully binary (three-step)", {}),
    ("clipping schedule", "--clipping", "what the clipped phase turns on: both, gradients (clipped STE), weights (weight clipping) or none", {}),
    ("clipping schedule", "--switch-epoch", "vanilla-then-clipped: clip from 0-based epoch E on", {"metavar": "E"}),
    ("clipping schedule", "--patience", "vanilla-then-clipped: clip after N epochs without a better validation accuracy", {"metavar": "N"}),
    ("clipping schedule", "--lr-factor", "multiply the LR by F at the switch (two-stage: for the fine-tuning stage)", {"metavar": "F"}),
    ("clipping schedule", "--switch-bn-momentum", "BN momentum from the switch on (two-stage: of the fine-tuned model)", {"metavar": "M"}),
    ("clipping schedule", "--pretrain-epochs", "two-stage, three-step: epochs of float pretraining", {"metavar": "N", "minimum": 1}),
    ("clipping schedule", "--activation-epochs", "three-step: epochs of binary activations with real weights, between the float and the fully binary stage", {"metavar": "N", "minimum": 1}),
    ("beyond the study", "--weight-binarisation", "how weights are binarised in training: deterministic (sign) or stochastic (+1 with probability hard_sigmoid(w), BinaryConnect); inference is always the sign", {}),
    ("beyond the study", "--activation-binarisation", "binarynet: how activations are binarised in training, deterministic or stochastic", {}),
    ("beyond the study", "--distill", "two-stage, three-step: train the binary stages against the frozen float twin's outputs softened at temperature T (KL divergence)", {"metavar": "T"}),
    ("beyond the study", "--distill-weight", "with --distill: weight A of the KL term, in (0, 1]; the label loss gets 1 - A (default 1)", {"metavar": "A"}),
    ("beyond the study", "--weight-decay", "decoupled weight decay (AdamW-style for Adam) of the first stage, or of every stage of a single-stage schedule (default 0)", {"metavar": "D"}),
    ("beyond the study", "--finetune-weight-decay", "two-stage, three-step: decoupled weight decay of the binary stage (default: --weight-decay)", {"metavar": "D"}),
    ("beyond the study", "--no-dead-zone", "do not measure the dead zone (saturated / beyond-clip latent weights and inputs, flipped signs) each epoch", {"dest": "dead_zone", "action": "store_false"}),
    ("last mile", "--plateau-action", "at the validation plateau (no gain > --plateau-margin within --plateau-window epochs): none (only recorded in summary.json), reduce_lr (LR x --plateau-lr-factor, once) or stop (early stopping); on the last stage of a schedule only", {}),
    ("last mile", "--plateau-window", "plateau window in epochs (default: a tenth of --epochs, at least 2)", {"metavar": "N"}),
    ("last mile", "--plateau-margin", "smallest validation-accuracy gain that counts, in [0, 1] (default 0.002)", {"metavar": "A"}),
    ("last mile", "--plateau-lr-factor", "reduce_lr: multiply the LR by F at the plateau (default 0.1)", {"metavar": "F"}),
    ("run", "--seed", "seed of initialisation and shuffling, 0 to 4294967295: one seed, one machine, identical histories", {"metavar": "K", "train_only": True}),
    ("run", "--nondeterministic", "allow TensorFlow's nondeterministic (faster GPU) kernels: runs with one seed then differ slightly, and a resumed run no longer equals an uninterrupted one exactly", {"dest": "deterministic", "action": "store_false"}),
    # train only: a multi-worker strategy is set up once per process, a study runs many
    ("run", "--strategy", "tf.distribute strategy: default (one device), mirrored (local GPUs), multi-worker (cluster in TF_CONFIG), tpu; --batch-size is per replica and the learning rate is scaled by the replica count", {"train_only": True}),
    ("speed", "--jit", "XLA compilation of the train step: auto (on for networks without convolutions on a CPU, off for convolutional ones; on for every network on a GPU), on or off", {}),
    ("speed", "--steps-per-execution", "train steps per call into TensorFlow: auto (the epoch's steps, at most 64) or N; the progress bar and the non-finite-loss check run once per block", {"metavar": "N|auto"}),
    ("run", "--tensorboard", "write TensorBoard logs to OUT/tensorboard/<stage>/ (view: tensorboard --logdir OUT): scalars (the level without LEVEL: the history's numbers per epoch and the share of binary weights that flipped sign), histograms (also each binary layer's latent weights and flipped share) or none", {"nargs": "?", "const": "scalars", "metavar": "LEVEL"}),
    ("run", "--verbose", "Keras output: 0 silent, 1 progress bar, 2 one line per epoch (and TensorFlow's own log lines)", {}),
)


def _rule_arguments(dest: str) -> dict[str, Any]:
    """argparse's type or choices for the setting `dest`, from `recipe.FIELDS` / `recipe.MODEL_FLAGS`."""
    from bnn_keras.recipe import FIELDS, MODEL_FLAGS

    rule = FIELDS.get(dest) or MODEL_FLAGS.get(dest)
    if rule is None or rule.kind in ("text", "path", "bool"):
        return {}
    if rule.kind == "choice":
        options = rule.options
        if all(isinstance(o, int) for o in options):
            return {"type": int, "choices": options}
        return {"choices": [o if o is not None else "none" for o in options]}
    return {"type": _typed(rule)}


def _add_recipe_flags(parser: argparse.ArgumentParser, *, study: bool) -> None:
    """The flags that override a recipe's settings (shared by train and study)."""
    groups: dict[str, Any] = {}
    for group, flag, help_text, extra in _RECIPE_FLAGS:
        extra = dict(extra)
        if extra.pop("train_only", False) and study:
            continue
        minimum = extra.pop("minimum", None)
        dest = extra.setdefault("dest", flag[2:].replace("-", "_"))
        if "action" not in extra and "type" not in extra:
            extra.update(_rule_arguments(dest))
        if minimum is not None:  # a flag stricter than its field (0 pretrain epochs is the field's "off")
            from bnn_keras.recipe import Rule

            extra["type"] = _typed(Rule("int", minimum))
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        groups[group].add_argument(flag, default=argparse.SUPPRESS, help=help_text, **extra)


_MODEL_FLAGS = ("hidden_units", "width_multiplier", "block_order", "weight_clip", "binarize_input")


def _recipe(base: Any, args: argparse.Namespace) -> Any:
    """`base` with the flags given on the command line applied."""
    given = dict(vars(args))
    for name in ("command", "recipe", "quick", "tables", "grid", "seeds", "handler", "out", "overwrite", "imports", "unsafe_load"):
        given.pop(name, None)
    model_kwargs = {k: given.pop(k) for k in _MODEL_FLAGS if k in given}
    if model_kwargs.get("weight_clip") == "none":
        model_kwargs["weight_clip"] = None
    for name in ("lr_scaling", "tensorboard"):  # their None is spelled "none"
        if given.get(name) == "none":
            given[name] = None
    optimizer_kwargs = dict(given.pop("optimizer_kwargs", []))
    return base.override(model_kwargs=model_kwargs, optimizer_kwargs=optimizer_kwargs, **given)


def _train(args: argparse.Namespace) -> int:
    from bnn_keras import training

    if args.imports:
        from bnn_keras.export.cli import _import_modules

        _import_modules(args.imports)
    recipe = _recipe(training.get_recipe(args.recipe), args)
    if args.out is not None:
        recipe = recipe.replace(output_dir=args.out)
    training.run(recipe, overwrite=args.overwrite, unsafe_load=args.unsafe_load)
    return 0


_EXECUTOR_FLAGS = ("executor", "ray_address", "gpus_per_run", "cpus_per_run")


def _study(args: argparse.Namespace) -> int:
    from bnn_keras import study, training

    executor = {name: getattr(args, name) for name in _EXECUTOR_FLAGS}
    for name in _EXECUTOR_FLAGS:  # not recipe settings
        delattr(args, name)
    base = training.get_recipe(args.recipe)
    if args.quick:
        base = study.quick(base)
    base = _recipe(base, args)
    seeds = args.seeds if args.seeds is not None else (study.QUICK_SEEDS if args.quick else 3)
    result = study.run_study(args.out, base, tables=args.tables, seeds=seeds, grid=args.grid, quick=args.quick, **executor)
    if result["failed"]:
        runs = sum(result[k] for k in ("trained", "skipped", "copied", "failed"))
        print(f"{PROG}: error: {result['failed']} of {runs} runs failed: their reasons are in {Path(args.out) / 'tables.md'}", file=sys.stderr)
        return 1
    return 0


def _add_export(subparsers: Any, wanted: bool) -> None:
    """Register `export`; import bnn_keras.export (heavy) only when it is the command."""
    parser = subparsers.add_parser(
        "export",
        help="convert a trained model to TFLite / Larq Compute Engine (see 'bnn-keras export --help')",
        description="Convert a saved Keras model (e.g. best_model.keras) to TFLite / a Larq Compute Engine flatbuffer.",
    )
    if wanted:
        from bnn_keras import export

        export.add_export_arguments(parser)
        parser.set_defaults(handler=export.run_export)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``bnn-keras`` parser (`argv` only decides whether export's flags are loaded)."""
    from bnn_keras import study
    from bnn_keras.recipe import RECIPES, Rule

    parser = _Parser(
        prog=PROG,
        description="Train binary neural networks the way Alizadeh et al., 'An Empirical Study of "
        "Binary Neural Networks' Optimisation' (ICLR 2019), found works best.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True

    recipes = sorted(RECIPES)
    train = subparsers.add_parser(
        "train",
        help="train one recipe of the study",
        description="Train one recipe of the study. Every flag overrides the recipe's setting; "
        "the defaults are the study's (mnist_mlp: 3x2048 MLP, Adam 1e-3 -> 3e-6, 250 epochs, batch 100, "
        "BN momentum 0.85, squared hinge, on the embedded Fashion-MNIST subset; cifar10_vgg10: VGG-10, "
        "Adam 3e-3 -> 2e-6, 500 epochs, batch 50, BN momentum 0.9). Quick start: "
        "bnn-keras train mnist_mlp --epochs 10 --hidden-units 512 512 512 --out runs/quickstart",
    )
    train.add_argument("recipe", choices=recipes, metavar="RECIPE", help=f"one of: {', '.join(recipes)}")
    train.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/RECIPE); the same command again continues an interrupted run there")
    train.add_argument("--overwrite", action="store_true", help="replace the run the output folder holds (needed when its settings differ)")
    own = train.add_argument_group("your own model")
    own.add_argument("--model-file", default=argparse.SUPPRESS, metavar="FILE", help="train this saved Larq model (.keras, .h5, SavedModel) instead of the recipe's: its sign quantisers and weight clips are made switchable; its input shape and classes must fit the dataset")
    own.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE", help="import MODULE (on PYTHONPATH) first, so the custom Keras objects of --model-file load; repeatable")
    own.add_argument("--unsafe-load", action="store_true", help="load a --model-file that carries code (a Lambda layer): only for a file you trust")
    _add_recipe_flags(train, study=False)
    train.set_defaults(handler=_train)

    grid = subparsers.add_parser(
        "study",
        help="run the study's ablation tables (resumable)",
        description="Train every cell of the study's tables for several seeds into OUT/<table>/<cell>/seed<k>/ "
        "and write OUT/tables.md and OUT/<table>.png. Re-running skips finished runs. The flags below "
        "override the base recipe every cell starts from.",
    )
    grid.add_argument("--recipe", choices=recipes, default="mnist_mlp", help="base recipe (default: mnist_mlp)")
    grid.add_argument("--quick", action="store_true", help=f"small enough for a laptop CPU in minutes: embedded data, 2x128 MLP (or 1/16-width VGG-10), 3 epochs, {study.QUICK_SEEDS} seeds")
    grid.add_argument("--tables", nargs="+", choices=list(study.TABLES), default=None, metavar="TABLE", help=f"tables to run (default: the paper's {', '.join(study.DEFAULT_TABLES)}; none with --grid): {', '.join(study.TABLES)}")
    grid.add_argument("--grid", action="append", default=None, metavar="KEY=V1,V2", help="sweep a setting: every combination of the --grid flags is a cell of table 'grid' (OUT/grid/KEY=V,.../seedK); KEY is a recipe field (batch_size, optimizer, lr_start, ...), opt.NAME (opt.beta_2) or model.NAME (model.hidden_units=256x256,512x512); repeatable; without --tables only the grid runs")
    grid.add_argument("--seeds", type=_typed(Rule("int", 1, study.MAX_SEEDS)), default=None, metavar="N", help=f"seeds 0..N-1 per cell (default: 3, or {study.QUICK_SEEDS} with --quick)")
    grid.add_argument("--out", default="runs/study", metavar="DIR", help="study folder (default: runs/study); with --executor ray, on a filesystem every node sees at the same path")
    spread = grid.add_argument_group("executor")
    spread.add_argument("--executor", choices=study.EXECUTORS, default="local", help="local: the runs one after another in this process (default); ray: each run a Ray task, in parallel, retried when its worker dies (needs: " + study.RAY_INSTALL + ")")
    spread.add_argument("--ray-address", default=None, metavar="ADDR", help="ray: join the cluster 'ray start --head' started (HOST:6379, or auto); default: start a local Ray instance")
    spread.add_argument("--gpus-per-run", type=_typed(Rule("number", 0)), default=None, metavar="G", help="ray: GPUs each run asks for (default 0; a fraction shares a GPU)")
    spread.add_argument("--cpus-per-run", type=_typed(Rule("number", 0, low_open=True)), default=None, metavar="C", help="ray: CPUs each run asks for (default 1)")
    _add_recipe_flags(grid, study=True)
    grid.set_defaults(handler=_study)

    _add_export(subparsers, wanted=bool(argv) and argv[0] == "export")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bnn-keras`` with `argv` (default: sys.argv[1:]); return the exit status.

    Exit status: 0 done, 1 the run diverged, 2 bad input (one line, nothing written),
    3 an internal error (one line; the traceback goes to a file it names), 130 Ctrl-C.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    from bnn_keras import TENSORFLOW_LOG as tensorflow_log

    if explicit_verbose(argv) == "2":  # the user asked for everything
        sys.stderr.write(tensorflow_log)
    else:  # TensorFlow's Python-side notices ("Compiled the loaded model ...", "Skipping full serialization ...")
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
    from bnn_keras.data import DataUnavailableError
    from bnn_keras.training import TrainingDivergedError

    try:
        args = build_parser(argv).parse_args(argv)
        return int(args.handler(args) or 0)
    except SystemExit as exit_:  # --help, or argparse's own exit
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except TrainingDivergedError as error:  # a failed run, not a usage mistake
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resume = " (the same command continues after the last finished epoch)" if argv[:1] == ["train"] else ""
        print(f"\n{PROG}: interrupted{resume}", file=sys.stderr)
        return 130
    except Exception as error:
        if isinstance(error, (UsageError, DataUnavailableError)) or _bad_input(error):
            print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
            return 2
        fault = _environment_fault(error)
        if fault is not None:
            again = "; the same command then continues after the last finished epoch" if argv[:1] == ["train"] else ""
            print(f"{PROG}: error: {fault}{again}", file=sys.stderr)
            return 2
        return _internal_error(error, tensorflow_log)


_FAULTS = {  # errno -> (what TensorFlow's message says, advice)
    errno.ENOSPC: ("No space left on device", "free some space"),
    errno.EDQUOT: ("Disk quota exceeded", "free some space"),
    errno.EROFS: ("Read-only file system", "choose a writable folder"),
    errno.EACCES: ("Permission denied", "choose a folder you can write"),
    errno.ENAMETOOLONG: ("File name too long", "choose a shorter name"),
}


def _environment_fault(error: BaseException) -> str | None:
    """A full disk or an unwritable path (Python's OSError or TensorFlow's), in one line; None otherwise."""
    if isinstance(error, OSError) and error.errno in _FAULTS:
        text, advice = _FAULTS[error.errno]
        where = f" writing {os.fspath(error.filename)!r}" if error.filename else ""
        return f"{text.lower()}{where}: {advice}"
    if type(error).__module__.startswith("tensorflow"):
        message = " ".join(str(error).split())
        for text, advice in _FAULTS.values():
            if text in message:
                path = re.search(r"(\S+?);? " + re.escape(text), message)
                where = f" writing in {os.path.dirname(path.group(1))!r}" if path and "/" in path.group(1) else ""
                return f"{text.lower()}{where}: {advice}"
    return None


def _bad_input(error: BaseException) -> bool:
    """A ValueError that bnn_keras raised itself (it checks input); one from deeper down is a bug.

    bnn_keras words its ValueErrors for the user, and re-raises foreign ones it expects
    (`raise ... from None`), so the frame that raised is ours exactly when it is input.
    """
    if not isinstance(error, ValueError) or error.__traceback__ is None:
        return False
    raised_in = traceback.extract_tb(error.__traceback__)[-1].filename
    return Path(raised_in).resolve().is_relative_to(Path(__file__).resolve().parent)


def _internal_error(error: BaseException, tensorflow_log: str) -> int:
    """One line naming a file with the traceback (and TensorFlow's start-up log); exit status 3."""
    descriptor, path = tempfile.mkstemp(prefix="bnn-keras-error-", suffix=".txt")
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write("".join(traceback.format_exception(error)))
        if tensorflow_log:
            file.write("\nTensorFlow's start-up log:\n" + tensorflow_log)
    print(
        f"{PROG}: internal error ({type(error).__name__}: {_one_line(error)[:200]}); "
        f"please report it with the traceback in {path}",
        file=sys.stderr,
    )
    return 3


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())  # one line, whatever the message held


if __name__ == "__main__":
    sys.exit(main())
