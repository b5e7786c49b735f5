"""One table of field rules: Recipe validation and the CLI's types and choices come from it."""

import argparse
import re
from pathlib import Path

import pytest

from bnn_keras import cli, models, recipe, training
from bnn_keras.recipe import FIELDS, RECIPES, Recipe

PACKAGE = Path(recipe.__file__).parent


def _action(parser, flag):
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = subparsers.choices["train"]
    return next(a for a in train._actions if flag in a.option_strings)


def test_recipes_are_hashable_and_equal_recipes_hash_alike():
    first = RECIPES["mnist_mlp"]
    again = Recipe.from_dict(first.to_dict())
    assert again == first and hash(again) == hash(first)
    assert hash(first.replace(epochs=3)) != hash(first)
    assert {first: "a", again: "b"} == {first: "b"}  # usable as a dict key


@pytest.mark.parametrize("flag, expected", [
    ("--weight-clip", ["unit", "glorot", "none"]),      # models.WEIGHT_CLIPS, None spelled "none"
    ("--lr-scaling", ["none", "update", "gradient"]),   # recipe.LR_SCALINGS
    ("--variant", list(models.VARIANTS)),
    ("--schedule", list(recipe.SCHEDULES)),
    ("--clipping", list(recipe.CLIPPINGS)),
    ("--optimizer", list(FIELDS["optimizer"].options)),
])
def test_cli_choices_come_from_the_field_rules(flag, expected):
    assert list(_action(cli.build_parser(), flag).choices) == expected


def test_a_new_choice_in_the_rules_reaches_the_cli(monkeypatch):
    monkeypatch.setattr(models, "WEIGHT_CLIPS", (*models.WEIGHT_CLIPS, "half"))
    monkeypatch.setitem(recipe.MODEL_FLAGS, "weight_clip", recipe.Rule("choice", choices=models.WEIGHT_CLIPS))
    assert "half" in _action(cli.build_parser(), "--weight-clip").choices


@pytest.mark.parametrize("flag, field, text", [
    ("--bn-momentum", "bn_momentum", "1.0"), ("--lr", "lr_start", "0"), ("--epochs", "epochs", "0"),
    ("--switch-epoch", "switch_epoch", "-1"), ("--limit", "limit", "0"),
])
def test_cli_and_recipe_say_the_same_expectation(flag, field, text):
    parse = _action(cli.build_parser(), flag).type
    with pytest.raises(argparse.ArgumentTypeError) as from_cli:
        parse(text)
    with pytest.raises(ValueError) as from_recipe:
        training.RECIPES["mnist_mlp"].replace(**{field: type(getattr(RECIPES["mnist_mlp"], field) or 1)(float(text))})
    expected = FIELDS[field].expected.replace(" or None", "")
    assert f"expected {expected}, got" in str(from_cli.value)
    assert f"{field} must be {FIELDS[field].expected}, got" in str(from_recipe.value)


def test_no_source_file_cites_a_document_that_does_not_exist():
    root = PACKAGE.parent
    cited = {m for f in PACKAGE.rglob("*.py") for m in re.findall(r"\b(docs/[\w./-]+\.md)\b", f.read_text())}
    assert [c for c in cited if not (root / c).exists()] == []
