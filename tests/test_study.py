"""The study grid: cells and seeds, resumability, shared runs, the Markdown tables."""

import json
import os

import numpy as np
import pytest

from bnn_keras import study, training
from bnn_keras.training import Recipe

BASE = Recipe(
    name="base",
    limit=300,
    model_kwargs={"hidden_units": (16,)},
    epochs=2,
    batch_size=50,
    lr_start=1e-2,
    lr_end=1e-3,
    verbose=0,
)


class FakeRun:
    """Stands in for training.run: writes summary.json/history.json with a test error from the recipe."""

    def __init__(self):
        self.calls = []

    def error(self, recipe):
        return 0.10 + 0.01 * recipe.seed + (0.05 if recipe.optimizer == "sgd" else 0.0)

    def __call__(self, recipe):
        self.calls.append(recipe.name)
        out = recipe.out
        out.mkdir(parents=True, exist_ok=True)
        error = self.error(recipe)
        rows = [{"epoch": e, "val_accuracy": 0.5 + 0.1 * e} for e in range(recipe.epochs)]
        summary = {
            "best_val_accuracy": 0.9,
            "best_epoch": recipe.epochs - 1,
            "best_epoch_1based": recipe.epochs,
            "test_accuracy_at_best": 1 - error,
            "test_error_at_best": error,
            "recipe": recipe.to_dict(),
        }
        training.write_json(out / "history.json", rows)
        training.write_json(out / "summary.json", summary)
        return {**summary, "history": rows}


@pytest.fixture
def fake(monkeypatch):
    run = FakeRun()
    monkeypatch.setattr(training, "run", run)
    return run


def test_grid_covers_every_cell_and_seed(tmp_path):
    grid = study.cell_recipes(tmp_path, BASE, list(study.DEFAULT_TABLES), [0, 1])
    cells = {key: list(study.TABLES[key].cells) for key in study.DEFAULT_TABLES}
    assert cells == {
        "optimizers": ["sgd", "momentum", "nesterov", "adagrad", "adadelta", "rmsprop", "adam", "bop"],
        "clipping": ["none", "weights", "gradients", "both"],
        "bn_momentum": ["0.8", "0.85", "0.9", "0.99"],
        "schedules": ["end-to-end", "two-stage", "vanilla-then-clipped"],
    }
    assert len(grid) == 2 * 19
    by_name = {(k, c, s): r for k, c, s, r in grid}
    sgd = by_name[("optimizers", "sgd", 1)]
    assert (sgd.optimizer, sgd.lr_start, sgd.seed) == ("sgd", 10.0, 1)
    assert sgd.lr_end == pytest.approx(10.0 * BASE.lr_end / BASE.lr_start)
    assert sgd.output_dir == os.fspath(tmp_path / "optimizers" / "sgd" / "seed1")
    gradients = by_name[("clipping", "gradients", 0)]
    assert (gradients.schedule, gradients.clipping) == ("clipped", "gradients")
    assert by_name[("bn_momentum", "0.99", 0)].bn_momentum == 0.99
    two = by_name[("schedules", "two-stage", 0)]
    assert (two.schedule, two.pretrain_epochs, two.epochs) == ("two-stage", 1, 1)  # same 2-epoch budget
    switch = by_name[("schedules", "vanilla-then-clipped", 0)]
    assert (switch.schedule, switch.switch_epoch, switch.epochs) == ("vanilla-then-clipped", 1, 2)
    with pytest.raises(ValueError, match="unknown study table 'nope'"):
        study.cell_recipes(tmp_path, BASE, ["nope"], [0])


def test_study_writes_tables_and_a_rerun_trains_nothing(tmp_path, fake):
    first = study.run_study(tmp_path, BASE, seeds=2, verbose=0)
    # The base settings (Adam at 1e-2) appear in all four tables (adam, clipping both, bn 0.85,
    # end-to-end): trained once per seed, copied three times.
    assert (first["trained"], first["copied"], first["skipped"]) == (2 * 16, 2 * 3, 0)
    assert len(fake.calls) == 32
    markdown = (tmp_path / "tables.md").read_text()
    assert markdown == first["markdown"]
    # sgd: errors 15% and 16% -> mean 15.50, sample std 0.71; others 10% and 11%.
    assert "| test error, this study (n=2) | 15.50 ± 0.71% | 10.50 ± 0.71% |" in markdown
    assert "| paper, MNIST | 4.48% | 1.87% | 1.86% | 1.28% | 1.22% | 1.21% | 1.19% | — |" in markdown
    assert "| best-val epoch (mean) | 2.0 |" in markdown
    assert "| two-stage | 90.00% (1.0) | 89.50% | 10.50 ± 0.71% |" in markdown
    for key in study.DEFAULT_TABLES:
        assert f"## {study.TABLES[key].title}" in markdown
        assert (tmp_path / f"{key}.png").read_bytes()[:4] == b"\x89PNG"
    copied = json.loads((tmp_path / "clipping" / "both" / "seed0" / "summary.json").read_text())
    assert copied["recipe"]["name"] == "clipping/both/seed0"

    stamp = os.stat(tmp_path / "optimizers" / "adam" / "seed0" / "summary.json").st_mtime_ns
    second = study.run_study(tmp_path, BASE, seeds=2, verbose=0)
    assert (second["trained"], second["copied"], second["skipped"]) == (0, 0, 38)
    assert len(fake.calls) == 32  # nothing trained again
    assert os.stat(tmp_path / "optimizers" / "adam" / "seed0" / "summary.json").st_mtime_ns == stamp
    assert second["markdown"] == markdown


def test_rerun_with_other_settings_is_refused(tmp_path, fake):
    study.run_study(tmp_path, BASE, tables=["bn_momentum"], seeds=1, verbose=0)
    with pytest.raises(ValueError, match="was trained with other settings"):
        study.run_study(tmp_path, BASE.replace(epochs=3), tables=["bn_momentum"], seeds=1, verbose=0)
    # More seeds later: only the new ones train.
    result = study.run_study(tmp_path, BASE, tables=["bn_momentum"], seeds=[0, 1], verbose=0)
    assert (result["trained"], result["skipped"]) == (4, 4)


def test_quick_preset():
    quick = study.quick()
    assert (quick.dataset, quick.epochs, quick.model_kwargs["hidden_units"], quick.verbose) == ("embedded", 3, (128, 128), 0)
    assert quick.lr_end == pytest.approx(quick.lr_start / 10)
    vgg = study.quick(training.RECIPES["cifar10_vgg10"])
    assert (vgg.dataset, vgg.model_kwargs["width_multiplier"], vgg.batch_size) == ("embedded", 0.0625, 50)


PAPER_SCHEDULES = {  # Alizadeh et al. (ICLR 2019), Table 5: best val acc (epoch) / test acc
    "end-to-end": "VGG-10 CIFAR-10: 89.76% (391) / 89.18%; ResNet-18 CIFAR-10: 94.40% (457) / 91.16%",
    "two-stage": "VGG-10 CIFAR-10: 90.16% (24) / 89.32%; ResNet-18 CIFAR-10: 93.60% (17) / 91.18%",
    "vanilla-then-clipped": "—",
}


def _schedules_row_from_files(folder, cell):
    """The Markdown row of one cell (one seed), rebuilt from its summary.json and history.json."""
    summary = json.loads((folder / "summary.json").read_text())
    rows = json.loads((folder / "history.json").read_text())
    stage = "finetune" if cell == "two-stage" else "train"  # two-stage: the binary stage's best
    val = [row["val_accuracy"] for row in rows if row["stage"] == stage]
    best = int(np.argmax(val))
    assert (summary["best_epoch"], summary["best_epoch_1based"]) == (best, best + 1)
    assert summary["best_val_accuracy"] == val[best]
    assert summary["test_accuracy_at_best"] == [r for r in rows if r["stage"] == stage][best]["test_accuracy"]
    test = summary["test_accuracy_at_best"]
    assert summary["test_error_at_best"] == pytest.approx(1 - test, abs=1e-12)
    return (
        f"| {cell} | {100 * val[best]:.2f}% ({best + 1:.1f}) | {100 * test:.2f}% | "
        f"{100 * (1 - test):.2f}% | {PAPER_SCHEDULES[cell]} |"
    ), test


def test_real_schedules_table_end_to_end(tmp_path):
    """Three real runs: each table row equals the one rebuilt from that cell's files, whose best
    epoch is the argmax of its history and whose error is 1 - its test accuracy."""
    result = study.run_study(tmp_path, BASE, tables=["schedules"], seeds=[0], verbose=0)
    assert (result["trained"], result["skipped"]) == (3, 0)
    runs = result["tables"]["schedules"]
    assert runs["two-stage"][0]["stage_boundary_epoch"] == 1
    assert runs["vanilla-then-clipped"][0]["switched_at_epoch"] == 1
    markdown_lines = result["markdown"].splitlines()
    for cell in ("end-to-end", "two-stage", "vanilla-then-clipped"):
        folder = tmp_path / "schedules" / cell / "seed0"
        assert {"summary.json", "history.json", "best_model.keras", "curves.png"} <= set(os.listdir(folder))
        row, test_accuracy = _schedules_row_from_files(folder, cell)
        assert row in markdown_lines  # one seed: the mean is the value, no std column
        assert test_accuracy > 0.35  # 10 classes; seed 0 gives 0.543, 0.567, 0.543
    assert (tmp_path / "tables.md").read_text() == result["markdown"]
    stamps = [os.stat(p).st_mtime_ns for p in sorted(tmp_path.glob("schedules/*/seed0/summary.json"))]
    again = study.run_study(tmp_path, BASE, tables=["schedules"], seeds=[0], verbose=0)
    assert (again["trained"], again["skipped"]) == (0, 3)
    assert [os.stat(p).st_mtime_ns for p in sorted(tmp_path.glob("schedules/*/seed0/summary.json"))] == stamps
    assert again["markdown"] == result["markdown"]
    for cell, summaries in again["tables"]["schedules"].items():
        assert summaries[0]["test_error_at_best"] == runs[cell][0]["test_error_at_best"], cell


@pytest.mark.parametrize("seeds, message", [
    (0, "seeds must be a count in [1, 1000] (runs per cell), got 0"),
    (2**31, "seeds must be a count in [1, 1000] (runs per cell), got 2147483648"),
    (range(1001), "seeds must name at most 1000 seeds (runs per cell), got 1001"),
    ([], "seeds must name at least one seed"),
])
def test_a_seed_count_out_of_range_is_refused_before_the_grid_is_built(tmp_path, seeds, message):
    with pytest.raises(ValueError) as error:
        study.run_study(tmp_path / "s", study.quick(), tables=["clipping"], seeds=seeds)
    assert str(error.value) == message
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- beyond the study


def test_beyond_tables_set_what_they_claim_to_compare(tmp_path):
    base = BASE.replace(epochs=6)
    grid = {(key, cell): recipe for key, cell, _, recipe in study.cell_recipes(
        tmp_path, base, ["stochastic", "distillation", "weight_decay", "dead_zone"], [0])}
    stochastic = grid[("stochastic", "weight_binarisation=stochastic,variant=binarynet")]
    assert (stochastic.weight_binarisation, stochastic.activation_binarisation) == ("stochastic", "stochastic")
    assert grid[("stochastic", "weight_binarisation=stochastic,variant=binaryconnect")].activation_binarisation == "deterministic"
    assert stochastic.model_kwargs["weight_clip"] == "glorot"
    two, three = grid[("distillation", "two-stage + distillation")], grid[("distillation", "three-step")]
    assert (two.schedule, two.pretrain_epochs, two.epochs, two.distill, two.variant) == ("two-stage", 3, 3, 1.0, "binarynet")
    assert (three.schedule, three.pretrain_epochs, three.activation_epochs, three.epochs, three.distill) == (
        "three-step", 3, 1, 2, None)
    decay = grid[("weight_decay", "weight_decay=5e-6,finetune_weight_decay=0")]
    assert (decay.stage_weight_decay("pretrain"), decay.stage_weight_decay("finetune")) == (5e-6, 0.0)
    switched = grid[("dead_zone", "schedule=vanilla-then-clipped,optimizer=sgd")]
    assert (switched.switch_epoch, switched.optimizer, switched.lr_start) == (3, "sgd", study.OPTIMIZER_LR["sgd"])


def test_dead_zone_table_shows_the_shares_at_the_first_early_and_last_epoch(tmp_path, monkeypatch):
    fake = FakeRun()

    def run(recipe):
        summary = fake(recipe)
        sgd = recipe.optimizer == "sgd"
        rows = [{"epoch": e, "val_accuracy": 0.5, "test_accuracy": 0.8 + 0.01 * e, "dead_zone_saturated": 0.01 * (e + 1),
                 "dead_zone_beyond": 0.0, "dead_zone_flipped": 0.02 if sgd else 0.04} for e in range(recipe.epochs)]
        training.write_json(recipe.out / "history.json", rows)
        return summary

    monkeypatch.setattr(training, "run", run)
    result = study.run_study(tmp_path, BASE.replace(epochs=20), tables=["dead_zone"], seeds=1, verbose=0)
    markdown = result["markdown"]
    # early epoch: a tenth of 20 -> 2; at clip 1%, 2%, 20%; test error at epoch 2: 19%
    assert "| vanilla | adam | 10.00% | 19.00% | 1.00 / 2.00 / 20.00% | 0.00 / 0.00 / 0.00% | 4.00% |" in markdown
    assert "| clipped | sgd | 15.00% | 19.00% | 1.00 / 2.00 / 20.00% | 0.00 / 0.00 / 0.00% | 2.00% |" in markdown
    for name in ("dead_zone.png", "dead_zone_saturated.png", "dead_zone_beyond.png", "dead_zone_flipped.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
