"""Sweeps of any recipe setting: ``KEY=V1,V2,...`` to the cells of a study table.

A grid is a list of `Axis` (a setting and its values); its cells are every combination,
each a recipe override named ``KEY=V,KEY2=V2`` (the folder ``OUT/<table>/<cell>/``).

Keys (`known_keys`):

- a `Recipe` field that changes training (``batch_size``, ``optimizer``, ``lr_start``,
  ``bn_momentum``, ``schedule``, ``variant``, ...; not ``name``, ``seed`` (seeds are the
  study's own axis), folders or verbosity);
- ``opt.NAME``: an optimiser hyperparameter (``optimizer_kwargs``: ``opt.beta_2``,
  ``opt.momentum``, ...);
- ``model.NAME``: a model-builder argument (``model_kwargs``: ``model.hidden_units=256x256,512x512``,
  ``model.width_multiplier``, ``model.block_order``, ...).

Values are read by the setting's own rule (`bnn_keras.recipe.FIELDS`, `HYPERPARAMETERS`,
`MODEL_FLAGS`), so a bad key or value fails in one line before anything trains. A cell
sets exactly what it names: sweeping ``optimizer`` keeps the base's learning rate, and
sweeping ``lr_start`` keeps the base's ``lr_end`` (sweep both to keep their ratio).

```python
from bnn_keras import grid
axes = grid.parse(["opt.beta_2=0.9,0.99,0.999", "batch_size=50,100"])
cells = grid.cells(axes)   # {"opt.beta_2=0.9,batch_size=50": overrides, ...}, 6 cells
```
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from bnn_keras.recipe import FIELDS, HYPERPARAMETERS, MODEL_ARGUMENTS, MODEL_FLAGS, Recipe, Rule

__all__ = ["Axis", "NOT_SWEPT", "cells", "known_keys", "parse", "parse_axis"]

NOT_SWEPT: tuple[str, ...] = (
    "name", "seed", "output_dir", "data_dir", "raw_dir", "model_file", "model_sha256", "verbose", "tensorboard",
    "strategy",  # set up once per process: a study trains many runs in one
)
"""Recipe fields a grid does not sweep: names, seeds (the study's own axis), folders, files, logging, the strategy."""

MAX_CELLS = 10_000
"""The most combinations one grid may have."""

Overrides = Callable[[Recipe], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class Axis:
    """One swept setting: its key, its values, and how each value is written in cell names."""

    key: str
    values: tuple[Any, ...]
    texts: tuple[str, ...]


def known_keys() -> dict[str, list[str]]:
    """The keys a grid takes, by kind: recipe fields, ``opt.`` hyperparameters, ``model.`` arguments."""
    return {
        "recipe": [k for k in FIELDS if k not in NOT_SWEPT],
        "opt": [f"opt.{k}" for k in HYPERPARAMETERS],
        "model": [f"model.{k}" for k in MODEL_FLAGS],
    }


def _known() -> str:
    keys = known_keys()
    return (
        f"a recipe field ({', '.join(keys['recipe'])}), opt.NAME ({', '.join(k[4:] for k in keys['opt'])}) "
        f"or model.NAME ({', '.join(k[6:] for k in keys['model'])}, or another argument of the model's builder)"
    )


def _rule(key: str) -> Rule | None:
    """The rule that checks values of `key` (None: a model-builder argument the builder checks itself)."""
    prefix, _, name = key.partition(".")
    if prefix == "opt" and name:
        if name not in HYPERPARAMETERS:
            raise ValueError(f"unknown grid key {key!r}: expected {_known()}")
        return HYPERPARAMETERS[name]
    if prefix == "model" and name:
        if name in MODEL_ARGUMENTS:
            raise ValueError(f"grid key {key!r} is set from the recipe, not model_kwargs: sweep {name} itself")
        return MODEL_FLAGS.get(name)
    if key in FIELDS and key not in NOT_SWEPT:
        return FIELDS[key]
    raise ValueError(f"unknown grid key {key!r}: expected {_known()}")


def _literal(text: str) -> Any:
    """A model-builder value from text: none, true/false, an integer, a number, AxB (a tuple) or the text."""
    lowered = text.lower()
    if lowered in ("none", "true", "false"):
        return {"none": None, "true": True, "false": False}[lowered]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    parts = text.split("x")
    if len(parts) > 1 and all(p.isdigit() for p in parts):
        return tuple(int(p) for p in parts)
    return text


def _value(key: str, rule: Rule | None, text: str) -> Any:
    """`text` read by `rule`; ValueError (one line: key, expected, given) when it does not accept it."""
    if rule is None:
        return _literal(text)
    if rule.kind == "int" and "x" in text and key == "model.hidden_units":
        value = _literal(text)
        values = value if isinstance(value, tuple) else (value,)
        if not all(isinstance(v, int) and rule.accepts(v) for v in values):
            raise ValueError(f"grid {key} values must be widths like 256x256 ({rule.expected} each), got {text!r}")
        return values
    if rule.kind == "choice":
        for option in rule.options:
            if text == ("none" if option is None else str(option)) or (option is None and text == "None"):
                return option
        names = ", ".join("none" if o is None else str(o) for o in rule.options)
        raise ValueError(f"unknown grid value {text!r} for {key}: expected one of {names}")
    if rule.kind == "bool":
        if text.lower() not in ("true", "false"):
            raise ValueError(f"grid {key} values must be true or false, got {text!r}")
        return text.lower() == "true"
    if rule.kind == "text":
        value: Any = text
    elif rule.optional and text.lower() == "none":
        value = None
    else:
        try:
            value = rule.parse(text)
        except Exception:  # argparse.ArgumentTypeError: the rule's own words say what is expected
            raise ValueError(f"grid {key} values must be {rule.expected}, got {text!r}") from None
    rule.check(f"grid {key}", value)
    return (value,) if key == "model.hidden_units" else value


def _text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return "x".join(map(str, value))
    return str(value)


def parse_axis(spec: str | tuple[str, Sequence[Any]]) -> Axis:
    """``"KEY=V1,V2"`` (or ``(KEY, [values])`` from Python) to a checked `Axis`."""
    if isinstance(spec, str):
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ValueError(f"a grid must be KEY=V1,V2,... (e.g. opt.beta_2=0.9,0.999), got {spec!r}")
        texts = tuple(t.strip() for t in raw.split(","))
        if "" in texts:
            raise ValueError(f"grid {key} has an empty value in {raw!r}: expected values separated by single commas")
        rule = _rule(key)
        values = tuple(_value(key, rule, t) for t in texts)
    else:
        key, given = spec
        if isinstance(given, (str, bytes)) or not isinstance(given, Iterable):
            raise ValueError(f"grid {key} values must be a list, got {given!r}")
        rule = _rule(key)
        values = tuple(tuple(v) if isinstance(v, list) else v for v in given)
        for v in values:
            for item in (v if key == "model.hidden_units" and isinstance(v, tuple) else (v,)):
                if rule is not None:
                    rule.check(f"grid {key}", item)
        texts = tuple(_text(v) for v in values)
    if not values:
        raise ValueError(f"grid {key} has no values: expected at least one")
    if len(set(texts)) != len(texts):
        raise ValueError(f"grid {key} repeats a value ({', '.join(texts)}): expected each value once")
    for text in texts:
        if "/" in text or "\\" in text or text.startswith("."):
            raise ValueError(f"grid {key} value {text!r} cannot name a folder: expected no slashes and no leading dot")
    return Axis(key, values, texts)


def parse(specs: Iterable[str | tuple[str, Sequence[Any]]] | Mapping[str, Sequence[Any]]) -> list[Axis]:
    """Every axis of a grid, checked: known keys, accepted values, each key once, not too many cells."""
    items = list(specs.items()) if isinstance(specs, Mapping) else list(specs)
    axes = [parse_axis(item) for item in items]
    keys = [axis.key for axis in axes]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"grid key(s) {', '.join(repeated)} given twice: expected each key in one --grid")
    count = int(np.prod([len(axis.values) for axis in axes])) if axes else 0
    if count > MAX_CELLS:
        raise ValueError(f"the grid has {count:,} combinations: expected at most {MAX_CELLS:,}")
    return axes


def _changes(base: Recipe, assignment: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe fields that `assignment` (grid key -> value) changes in `base` (`Recipe.override` semantics)."""
    plain = {k: v for k, v in assignment.items() if "." not in k}
    opt = {k[4:]: v for k, v in assignment.items() if k.startswith("opt.")}
    model = {k[6:]: v for k, v in assignment.items() if k.startswith("model.")}
    new = base.override(model_kwargs=model, optimizer_kwargs=opt, **plain)
    return {f.name: getattr(new, f.name) for f in dataclasses.fields(new) if getattr(new, f.name) != getattr(base, f.name)}


def cells(
    axes: Sequence[Axis],
    *,
    fixed: Mapping[str, Any] | None = None,
    derive: Callable[[Recipe, Mapping[str, Any]], Mapping[str, Any]] | None = None,
    short_names: bool = False,
) -> dict[str, Overrides]:
    """Every combination of `axes` as a named recipe override, in axis order (the last varies fastest).

    `fixed` (grid keys -> values) is set in every cell; `derive(base, assignment)` adds
    fields that follow from a cell's values (e.g. a learning rate per optimiser);
    `short_names` names a cell by its values only (``0.9,0.999``) instead of ``KEY=V,...``.
    """
    named: dict[str, Overrides] = {}
    for combination in itertools.product(*(range(len(axis.values)) for axis in axes)):
        assignment = {**(fixed or {}), **{axis.key: axis.values[i] for axis, i in zip(axes, combination)}}
        parts = [axis.texts[i] if short_names else f"{axis.key}={axis.texts[i]}" for axis, i in zip(axes, combination)]

        def overrides(base: Recipe, assignment: Mapping[str, Any] = assignment) -> dict[str, Any]:
            derived = derive(base, assignment) if derive is not None else {}
            return _changes(base, {**assignment, **derived})

        named[",".join(parts)] = overrides
    return named
