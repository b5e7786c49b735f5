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
import json
import sys
from typing import Any, Callable, NoReturn, Sequence

__all__ = ["build_parser", "main"]

PROG = "bnn-keras"


class UsageError(Exception):
    """A command-line mistake: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage block) and never exit mid-parse."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# --------------------------------------------------------------------------- value types


def _number(kind: Callable[[str], Any], check: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = expected  # argparse names the type in its messages
    return parse


_positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
_nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: v > 0 and v != float("inf"), "a number > 0")
_momentum = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


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


def _add_recipe_flags(parser: argparse.ArgumentParser, *, study: bool) -> None:
    """The flags that override a recipe's settings (shared by train and study)."""
    from bnn_keras import distribute, models, optimizers, training

    S = argparse.SUPPRESS  # an absent flag keeps the recipe's value
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=S, help="'embedded' (packaged Fashion-MNIST subset), mnist, fashion_mnist, cifar10 or another TFDS image dataset")
    data.add_argument("--data-dir", dest="data_dir", default=S, metavar="DIR", help="TFDS data directory holding the prepared dataset")
    data.add_argument("--raw-dir", dest="raw_dir", default=S, metavar="DIR", help="folder with the original files (e.g. /usr/share/datasets/fashion-mnist), prepared into --data-dir once")
    data.add_argument("--limit", type=_positive_int, default=S, metavar="N", help="use only the first N training and N test examples")

    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=models.NAMES, default=S, help="network (default: the recipe's)")
    model.add_argument("--variant", choices=models.VARIANTS, default=S, help="float, binaryconnect (binary weights) or binarynet (binary weights and activations)")
    model.add_argument("--hidden-units", dest="hidden_units", type=_positive_int, nargs="+", default=S, metavar="N", help="mlp: units of each hidden layer (study: 2048 2048 2048)")
    model.add_argument("--width-multiplier", dest="width_multiplier", type=_positive_float, default=S, metavar="F", help="vgg10: multiply every width by F")
    model.add_argument("--weight-clip", dest="weight_clip", choices=("unit", "glorot", "none"), default=S, help="weight-clip range: [-1, 1], BinaryConnect's per-layer Glorot range, or no weight-clip constraint")
    model.add_argument("--real-input", dest="binarize_input", action="store_false", default=S, help="binarynet: keep the network's input real-valued (default: binarised)")
    model.add_argument("--bn-momentum", dest="bn_momentum", type=_momentum, default=S, metavar="M", help="BatchNormalization moving-average momentum, in [0, 1) (study: 0.85 MLP, 0.9 CNN)")
    model.add_argument("--loss", choices=training.LOSSES, default=S, help="squared_hinge on +-1 targets (study) or crossentropy")

    opt = parser.add_argument_group("optimiser")
    opt.add_argument("--optimizer", choices=optimizers.NAMES, default=S, help="optimiser (study: adam)")
    opt.add_argument("--opt", dest="optimizer_kwargs", type=_key_value, action="append", default=S, metavar="KEY=VALUE", help="extra optimiser hyperparameter, repeatable (e.g. --opt beta_2=0.99)")
    opt.add_argument("--lr", dest="lr_start", type=_positive_float, default=S, metavar="LR", help="learning rate of the first epoch (> 0)")
    opt.add_argument("--lr-end", dest="lr_end", type=_positive_float, default=S, metavar="LR", help="learning rate of the last epoch, exponential schedule (> 0)")
    opt.add_argument("--lr-schedule", dest="lr_schedule", choices=training.LR_SCHEDULES, default=S, help="exponential per-epoch decay --lr -> --lr-end (study), or constant --lr")
    opt.add_argument("--lr-scaling", dest="lr_scaling", choices=("update", "gradient"), default=S, help="BinaryConnect's Glorot per-layer LR scaling, on the update or on the gradient")
    opt.add_argument("--epochs", type=_positive_int, default=S, metavar="N", help="epochs to train (>= 1; the binary fine-tuning epochs for two-stage)")
    opt.add_argument("--batch-size", dest="batch_size", type=_positive_int, default=S, metavar="N", help="examples per batch")

    clip = parser.add_argument_group("clipping schedule")
    clip.add_argument("--schedule", choices=training.SCHEDULES, default=S, help="clipped from the start, vanilla STE throughout, vanilla then clipped, or float pretraining then binary fine-tuning")
    clip.add_argument("--clipping", choices=training.CLIPPINGS, default=S, help="what the clipped phase turns on: both, gradients (clipped STE), weights (weight clipping) or none")
    clip.add_argument("--switch-epoch", dest="switch_epoch", type=_nonnegative_int, default=S, metavar="E", help="vanilla-then-clipped: clip from 0-based epoch E on")
    clip.add_argument("--patience", type=_positive_int, default=S, metavar="N", help="vanilla-then-clipped: clip after N epochs without a better validation accuracy")
    clip.add_argument("--lr-factor", dest="lr_factor", type=_positive_float, default=S, metavar="F", help="multiply the LR by F at the switch (two-stage: for the fine-tuning stage)")
    clip.add_argument("--switch-bn-momentum", dest="switch_bn_momentum", type=_momentum, default=S, metavar="M", help="BN momentum from the switch on (two-stage: of the fine-tuned model)")
    clip.add_argument("--pretrain-epochs", dest="pretrain_epochs", type=_positive_int, default=S, metavar="N", help="two-stage: epochs of float pretraining")

    run = parser.add_argument_group("run")
    if not study:
        run.add_argument("--seed", type=_nonnegative_int, default=S, metavar="K", help="seed of initialisation and shuffling: one seed, one machine, identical histories")
    run.add_argument("--nondeterministic", dest="deterministic", action="store_false", default=S, help="allow TensorFlow's nondeterministic (faster GPU) kernels: runs with one seed then differ slightly, and a resumed run no longer equals an uninterrupted one exactly")
    if not study:  # train only: a multi-worker strategy is set up once per process, a study runs many
        run.add_argument("--strategy", choices=distribute.STRATEGIES, default=S, help="tf.distribute strategy: default (one device), mirrored (local GPUs), multi-worker (cluster in TF_CONFIG), tpu; --batch-size is per replica and the learning rate is scaled by the replica count")
    run.add_argument("--verbose", type=int, choices=(0, 1, 2), default=S, help="Keras output: 0 silent, 1 progress bar, 2 one line per epoch")


_MODEL_FLAGS = ("hidden_units", "width_multiplier", "weight_clip", "binarize_input")


def _recipe(base: Any, args: argparse.Namespace) -> Any:
    """`base` with the flags given on the command line applied."""
    given = dict(vars(args))
    for name in ("command", "recipe", "quick", "tables", "seeds", "handler", "out", "overwrite"):
        given.pop(name, None)
    model_kwargs = {k: given.pop(k) for k in _MODEL_FLAGS if k in given}
    if model_kwargs.get("weight_clip") == "none":
        model_kwargs["weight_clip"] = None
    optimizer_kwargs = dict(given.pop("optimizer_kwargs", []))
    return base.override(model_kwargs=model_kwargs, optimizer_kwargs=optimizer_kwargs, **given)


def _train(args: argparse.Namespace) -> int:
    from bnn_keras import training

    recipe = _recipe(training.get_recipe(args.recipe), args)
    if args.out is not None:
        recipe = recipe.replace(output_dir=args.out)
    training.run(recipe, overwrite=args.overwrite)
    return 0


def _study(args: argparse.Namespace) -> int:
    from bnn_keras import study, training

    base = training.get_recipe(args.recipe)
    if args.quick:
        base = study.quick(base)
    base = _recipe(base, args)
    seeds = args.seeds if args.seeds is not None else (study.QUICK_SEEDS if args.quick else 3)
    study.run_study(args.out, base, tables=args.tables, seeds=seeds)
    return 0


def _export_unavailable(args: argparse.Namespace) -> int:
    raise UsageError("export is not available in this installation (bnn_keras.export is missing)")


def _add_export(subparsers: Any, wanted: bool) -> None:
    """Register `export`; import bnn_keras.export (heavy) only when it is the command."""
    parser = subparsers.add_parser(
        "export",
        help="convert a trained model to TFLite / Larq Compute Engine (see 'bnn-keras export --help')",
        description="Convert a saved Keras model (e.g. best_model.keras) to TFLite / a Larq Compute Engine flatbuffer.",
    )
    if not wanted:
        parser.set_defaults(handler=_export_unavailable)
        return
    try:
        from bnn_keras import export
    except ImportError:
        export = None
    if export is None or not hasattr(export, "add_export_arguments"):
        parser.set_defaults(handler=_export_unavailable)
        return
    export.add_export_arguments(parser)
    parser.set_defaults(handler=export.run_export)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``bnn-keras`` parser (`argv` only decides whether export's flags are loaded)."""
    from bnn_keras import study, training

    parser = _Parser(
        prog=PROG,
        description="Train binary neural networks the way Alizadeh et al., 'An Empirical Study of "
        "Binary Neural Networks' Optimisation' (ICLR 2019), found works best.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True

    recipes = sorted(training.RECIPES)
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
    grid.add_argument("--tables", nargs="+", choices=list(study.TABLES), default=None, metavar="TABLE", help=f"tables to run (default: all): {', '.join(study.TABLES)}")
    grid.add_argument("--seeds", type=_positive_int, default=None, metavar="N", help=f"seeds 0..N-1 per cell (default: 3, or {study.QUICK_SEEDS} with --quick)")
    grid.add_argument("--out", default="runs/study", metavar="DIR", help="study folder (default: runs/study)")
    _add_recipe_flags(grid, study=True)
    grid.set_defaults(handler=_study)

    _add_export(subparsers, wanted=bool(argv) and argv[0] == "export")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bnn-keras`` with `argv` (default: sys.argv[1:]); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from bnn_keras.data import DataUnavailableError
    from bnn_keras.training import TrainingDivergedError

    try:
        args = build_parser(argv).parse_args(argv)
        return int(args.handler(args) or 0)
    except SystemExit as exit_:  # --help, or argparse's own exit
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except (UsageError, DataUnavailableError, ValueError) as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except TrainingDivergedError as error:  # a failed run, not a usage mistake
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resume = " (the same command continues after the last finished epoch)" if argv[:1] == ["train"] else ""
        print(f"\n{PROG}: interrupted{resume}", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())  # one line, whatever the message held


if __name__ == "__main__":
    sys.exit(main())
