"""Sweeps of any setting (`bnn_keras.grid`, ``study --grid``) and the study's new tables as grids."""

import json
import math

import pytest

from bnn_keras import cli, grid, study, training
from bnn_keras.recipe import Recipe

from test_study import BASE, FakeRun


@pytest.fixture
def fake(monkeypatch):
    run = FakeRun()
    monkeypatch.setattr(training, "run", run)
    return run


def test_values_are_read_by_each_settings_rule():
    axes = grid.parse([
        "opt.beta_2=0.9,0.999", "batch_size=50,100", "lr_scaling=none,update",
        "model.hidden_units=256x256,512", "deterministic=true,false", "lr_end=none,1e-4",
    ])
    assert [a.values for a in axes] == [
        (0.9, 0.999), (50, 100), (None, "update"), ((256, 256), (512,)), (True, False), (None, 1e-4),
    ]
    assert axes[3].texts == ("256x256", "512")
    assert [type(v) for v in axes[1].values] == [int, int]
    from_python = grid.parse({"opt.beta_2": [0.9, 0.999], "model.hidden_units": [[64, 64]]})
    assert from_python[0].values == (0.9, 0.999) and from_python[1].values == ((64, 64),)
    assert from_python[1].texts == ("64x64",)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("foo=1,2", r"^unknown grid key 'foo': expected a recipe field \(dataset, .*batch_size.*\), opt\.NAME \(beta_1, "),
        ("opt.bogus=1", r"^unknown grid key 'opt.bogus'"),
        ("seed=1,2", r"^unknown grid key 'seed'"),  # the study's own axis
        ("output_dir=a,b", r"^unknown grid key 'output_dir'"),
        ("model.variant=float", r"^grid key 'model.variant' is set from the recipe, not model_kwargs: sweep variant itself$"),
        ("batch_size=0,100", r"^grid batch_size values must be an integer >= 1, got '0'$"),
        ("batch_size=1.5", r"^grid batch_size values must be an integer >= 1, got '1.5'$"),
        ("opt.beta_2=1.5", r"^grid opt.beta_2 values must be a number in \[0, 1\), got '1.5'$"),
        ("optimizer=sgdd", r"^unknown grid value 'sgdd' for optimizer: expected one of "),
        ("lr_scaling=x", r"^unknown grid value 'x' for lr_scaling: expected one of none, update, gradient$"),
        ("batch_size=50,,100", r"^grid batch_size has an empty value in '50,,100'"),
        ("batch_size=50,50", r"^grid batch_size repeats a value \(50, 50\): expected each value once$"),
        ("batch_size", r"^a grid must be KEY=V1,V2,\.\.\. \(e\.g\. opt\.beta_2=0\.9,0\.999\), got 'batch_size'$"),
        ("model.name=a/b", r"^grid model.name value 'a/b' cannot name a folder"),
    ],
)
def test_a_bad_key_or_value_fails_in_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        grid.parse([spec])
    assert "\n" not in str(error.value)


def test_a_key_given_twice_and_a_huge_grid_are_refused():
    with pytest.raises(ValueError, match=r"^grid key\(s\) batch_size given twice"):
        grid.parse(["batch_size=50", "batch_size=100"])
    many = ",".join(str(i) for i in range(1, 101))
    with pytest.raises(ValueError, match=r"^the grid has 1,000,000 combinations: expected at most 10,000$"):
        grid.parse([f"batch_size={many}", f"epochs={many}", f"limit={many}"])


def test_cells_are_named_key_value_unless_short_names():
    axes = grid.parse(["opt.beta_2=0.9,0.999", "batch_size=50"])
    assert list(grid.cells(axes)) == ["opt.beta_2=0.9,batch_size=50", "opt.beta_2=0.999,batch_size=50"]
    assert list(grid.cells(axes, short_names=True)) == ["0.9,50", "0.999,50"]


def test_every_combination_is_a_cell_that_sets_exactly_its_values(tmp_path):
    table = study.grid_table("g", "g", ["opt.beta_2=0.9,0.999", "batch_size=50,100,200"])
    assert list(table.cells) == [
        f"opt.beta_2={b},batch_size={n}" for b in ("0.9", "0.999") for n in (50, 100, 200)
    ]
    runs = study.cell_recipes(tmp_path, BASE, [table], [0])
    for _, cell, _, recipe in runs:
        values = dict(part.split("=") for part in cell.split(","))
        assert recipe.optimizer_kwargs == {"beta_2": float(values["opt.beta_2"])}
        assert recipe.batch_size == int(values["batch_size"])
        unchanged = {k: v for k, v in recipe.to_dict().items() if k not in ("optimizer_kwargs", "batch_size", "name", "output_dir")}
        assert unchanged == {k: v for k, v in BASE.to_dict().items() if k in unchanged}
        assert recipe.output_dir == str(tmp_path / "g" / cell / "seed0")


def test_a_cell_the_recipe_refuses_is_named_before_anything_trains(tmp_path, fake):
    with pytest.raises(ValueError, match=r"^study table 'grid', cell 'schedule=vanilla-then-clipped': schedule 'vanilla-then-clipped' needs switch_epoch or patience"):
        study.run_study(tmp_path / "s", BASE, grid=["schedule=vanilla-then-clipped"], seeds=1, verbose=0)
    assert fake.calls == [] and not (tmp_path / "s").exists()


# The settings each new table claims to vary (and what follows from them: an LR per optimiser or batch).
VARIED = {
    "sgd_batch": {"batch_size", "lr_start", "lr_end"},
    "momentum": {"optimizer", "optimizer_kwargs"},  # both at OPTIMIZER_LR 1.0
    "adam_betas": {"optimizer_kwargs"},
    "pooling": {"model_kwargs", "variant"},
    "lr_scaling": {"optimizer", "lr_scaling", "variant", "lr_start", "lr_end"},
    "last_mile": {"plateau_action"},
}


@pytest.mark.parametrize("key", sorted(VARIED))
def test_each_new_tables_cells_differ_in_exactly_the_settings_it_varies(key, tmp_path, fake):
    base = study.quick()
    study.run_study(tmp_path, base, tables=[key], seeds=1, verbose=0, quick=True)
    recorded = {}
    for cell in study.TABLES[key].cells:
        summary = json.loads((tmp_path / key / cell / "seed0" / "summary.json").read_text())
        recorded[cell] = {k: v for k, v in summary["recipe"].items() if k not in ("name", "output_dir")}
    first = next(iter(recorded.values()))
    differing = {k for r in recorded.values() for k in r if r[k] != first[k]}
    assert differing == VARIED[key]
    if key == "last_mile":
        assert {r["epochs"] for r in recorded.values()} == {12}  # its own --quick size
        assert [r["plateau_action"] for r in recorded.values()] == ["none", "reduce_lr", "stop"]
    if key == "sgd_batch":
        for r in recorded.values():
            assert r["optimizer"] == "sgd"
            assert r["lr_start"] == pytest.approx(study.OPTIMIZER_LR["sgd"] * math.sqrt(r["batch_size"] / 100))
    if key == "pooling":
        assert {(r["model"], r["model_kwargs"]["width_multiplier"]) for r in recorded.values()} == {("vgg10", 0.0625)}
        assert sorted({r["model_kwargs"]["block_order"] for r in recorded.values()}) == ["conventional", "paper"]
    if key == "adam_betas":
        assert sorted(tuple(sorted(r["optimizer_kwargs"].items())) for r in recorded.values()) == sorted(
            (("beta_1", b1), ("beta_2", b2)) for b1 in (0.5, 0.9) for b2 in (0.9, 0.99, 0.999)
        )


def test_a_grid_study_renders_a_row_per_combination_and_resumes(tmp_path, fake):
    first = study.run_study(tmp_path, BASE, grid=["optimizer=sgd,adam", "batch_size=50,100"], seeds=2, verbose=0)
    assert (first["trained"], first["skipped"]) == (8, 0)
    assert set(first["tables"]) == {"grid"}  # a grid alone runs no other table
    markdown = (tmp_path / "tables.md").read_text()
    assert "## Grid: optimizer x batch_size" in markdown
    assert "| optimizer | batch_size | test error | best val acc | best-val epoch | plateau epoch |" in markdown
    # FakeRun: error 0.10 + 0.01 x seed (+0.05 for sgd): seeds 0, 1 -> mean 15.50 (sgd), sample std 0.71.
    assert "| sgd | 50 | 15.50 ± 0.71% | 90.00% | 2.0 | — |" in markdown
    assert "| adam | 100 | 10.50 ± 0.71% | 90.00% | 2.0 | — |" in markdown
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    second = study.run_study(tmp_path, BASE, grid=["optimizer=sgd,adam", "batch_size=50,100"], seeds=2, verbose=0)
    assert (second["trained"], second["skipped"]) == (0, 8) and len(fake.calls) == 8
    # One more value later: only its runs train.
    third = study.run_study(tmp_path, BASE, grid=["optimizer=sgd,adam", "batch_size=50,100,200"], seeds=2, verbose=0)
    assert (third["trained"], third["skipped"]) == (4, 8)


def test_the_early_column_reads_each_runs_history(tmp_path, monkeypatch):
    class WithTests(FakeRun):
        def __call__(self, recipe):
            result = super().__call__(recipe)
            rows = [{"epoch": e, "val_accuracy": 0.5, "test_accuracy": 0.6 + 0.1 * e} for e in range(recipe.epochs)]
            training.write_json(recipe.out / "history.json", rows)
            return result

    monkeypatch.setattr(training, "run", WithTests())
    base = BASE.replace(epochs=20)
    study.run_study(tmp_path, base, tables=["momentum"], seeds=1, verbose=0)
    markdown = (tmp_path / "tables.md").read_text()
    # Early epoch = ceil(20 / 10) = 2 (1-based): test accuracy 0.7 -> error 30.00%.
    assert "| optimizer | opt.momentum | test error | best val acc | best-val epoch | plateau epoch | test error at epoch 2 |" in markdown
    assert "| nesterov | 0.99 | 10.00% | 90.00% | 20.0 | — | 30.00% |" in markdown
    assert "The study's claim: a higher momentum trains faster but ends worse." in markdown


def test_the_cli_grid_refuses_a_bad_key_in_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "s"
    code = cli.main(["study", "--quick", "--out", str(out), "--grid", "opt.nope=1,2"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.startswith("bnn-keras: error: unknown grid key 'opt.nope': expected a recipe field (")
    assert err.count("\n") == 1


def test_the_cli_grid_reaches_the_study(tmp_path, fake):
    out = tmp_path / "s"
    assert cli.main(["study", "--quick", "--seeds", "1", "--out", str(out), "--grid", "model.hidden_units=8,8x8", "--grid", "lr_start=0.01"]) == 0
    recipes = sorted(fake.calls)
    assert recipes == ["grid/model.hidden_units=8,lr_start=0.01/seed0", "grid/model.hidden_units=8x8,lr_start=0.01/seed0"]
    summary = json.loads((out / "grid" / "model.hidden_units=8x8,lr_start=0.01" / "seed0" / "summary.json").read_text())
    assert (summary["recipe"]["model_kwargs"]["hidden_units"], summary["recipe"]["lr_start"]) == ([8, 8], 0.01)


def test_the_base_tables_are_named_grids():
    assert study.TABLES["bn_momentum"].axes[0].values == (0.8, 0.85, 0.9, 0.99)
    assert [a.key for a in study.TABLES["clipping"].axes] == ["clipping"]
    assert isinstance(study.TABLES["bn_momentum"], study.Table) and study.DEFAULT_TABLES == (
        "optimizers", "clipping", "bn_momentum", "schedules",
    )
    assert Recipe().plateau_action == "none"


def test_python_values_are_checked_and_keys_trimmed_and_text_values_kept():
    with pytest.raises(ValueError, match=r"^grid batch_size must be an integer >= 1, got 0$"):
        grid.parse({"batch_size": [50, 0]})
    assert grid.parse(["batch_size =50,100"])[0].key == "batch_size"
    assert grid.parse(["dataset=embedded,mnist"])[0].values == ("embedded", "mnist")  # a text field
    assert grid.parse(["model.name=x,a1x2"])[0].values == ("x", "a1x2")  # not widths: kept as text
