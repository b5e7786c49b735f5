"""`export.verify._agreement` on hand-made outputs: which outputs count as class scores, and
how wide a top-1 tie is.

Verification compares Keras' outputs with the interpreter's; top-1 agreement is measured
only for outputs whose last axis holds more than one score, over every leading position,
and a class within `_TIE_RTOL` (relative to the row's largest score, at least 1) of the
top counts as a correct top-1.
"""

from __future__ import annotations

import numpy as np
import pytest

from bnn_keras.export.verify import _TIE_RTOL, _agreement, _flipped_within_rounding


def test_one_score_per_example_has_no_top1_only_a_difference():
    expected = np.array([0.1, 0.9, 0.4], np.float32)  # shape (batch,): one value each
    actual = np.array([0.9, 0.1, 0.4], np.float32)
    diffs, strict, tie_aware = _agreement([expected], [actual])
    assert diffs == [pytest.approx(0.8)]
    assert strict == tie_aware == []


def test_a_single_column_has_no_top1():
    expected = np.array([[0.1], [0.9]], np.float32)
    diffs, strict, tie_aware = _agreement([expected], [expected + 0.25])
    assert diffs == [pytest.approx(0.25)]
    assert strict == tie_aware == []


def test_two_classes_are_class_scores():
    expected = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.2, 0.1]], np.float32)
    actual = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.2, 0.1]], np.float32)
    diffs, strict, tie_aware = _agreement([expected], [actual])
    assert diffs == [1.0]
    assert strict == tie_aware == [0.75]


def test_top1_runs_over_every_leading_position_of_a_sequence_output():
    # (batch 2, positions 1, classes 3): the middle axis has length 1, the last is the classes
    expected = np.array([[[3.0, 1.0, 0.0]], [[0.0, 1.0, 3.0]]], np.float32)
    actual = np.array([[[3.0, 1.0, 0.0]], [[3.0, 1.0, 0.0]]], np.float32)
    _, strict, tie_aware = _agreement([expected], [actual])
    assert strict == tie_aware == [0.5]


@pytest.mark.parametrize(
    "runner_up, tied",
    [(1000.0 - 0.5 * 1000 * _TIE_RTOL, True), (1000.0 - 2 * 1000 * _TIE_RTOL, False)],
    ids=["within-tolerance", "beyond-tolerance"],
)
def test_the_tie_tolerance_grows_with_large_scores(runner_up, tied):
    # Keras' top score is 1000; the interpreter picks the runner-up. The tolerance is
    # 1e-5 x 1000 = 0.01 here, not 1e-5: float32 rounding at 1000 is about 6e-5.
    expected = np.array([[1000.0, runner_up, 0.0]], np.float32)
    actual = np.array([[999.0, 1000.0, 0.0]], np.float32)
    _, strict, tie_aware = _agreement([expected], [actual])
    assert strict == [0.0]
    assert tie_aware == [1.0 if tied else 0.0]


def test_the_tie_tolerance_is_absolute_below_a_score_of_one():
    # |scores| < 1: the tolerance is 1e-5 itself, so 0.5 vs 0.5 - 5e-6 ties and 0.5 - 1.5e-5 does not
    actual = np.array([[0.0, 1.0]], np.float32)
    assert _agreement([np.array([[0.5, 0.5 - 5e-6]], np.float32)], [actual])[2] == [1.0]
    assert _agreement([np.array([[0.5, 0.5 - 1.5e-5]], np.float32)], [actual])[2] == [0.0]


def test_each_output_is_measured_on_its_own():
    scores = np.array([[2.0, 1.0], [1.0, 2.0]], np.float32)
    value = np.array([[0.5], [0.5]], np.float32)
    diffs, strict, tie_aware = _agreement([scores, value], [scores[:, ::-1], value - 0.125])
    assert diffs == [1.0, 0.125]
    assert strict == tie_aware == [0.0]


def test_a_runner_up_exactly_at_the_tolerance_ties():
    # float64 scores, so the boundary is exact: top 1.0, runner-up 1.0 - _TIE_RTOL
    expected = np.array([[1.0, 1.0 - _TIE_RTOL]])
    assert _agreement([expected], [np.array([[0.0, 1.0]])])[1:] == ([0.0], [1.0])


def test_flips_within_rounding_are_counted_per_input_of_a_sequence_output():
    # (batch 2, positions 2, classes 3). Both inputs swap a near-tie (2.99 / 3.0) at their second
    # position: input 0 changes nothing else (max |diff| 0.01, 0.33% of the scale 3), input 1
    # also moves a score by 0.5 (17%). Within output_rtol 1%: only input 0's flip.
    expected = np.array([[[3.0, 1.0, 0.0], [0.0, 2.99, 3.0]]] * 2, np.float32)
    actual = expected.copy()
    actual[:, 1, 1:] = [3.0, 2.99]
    actual[1, 0, 2] = 0.5
    assert _flipped_within_rounding([expected], [actual], output_rtol=0.01) == 1
    assert _flipped_within_rounding([expected], [actual], output_rtol=0.2) == 2
    assert _flipped_within_rounding([expected], [expected.copy()], output_rtol=0.2) == 0


@pytest.mark.parametrize("options, message", [
    ({"output_rtol": 0}, "output_rtol must be a number > 0 or None, got 0"),
    ({"output_rtol": 1e-4, "max_wrong_share": 1.5}, r"max_wrong_share must be a number in \[0, 1\], got 1.5"),
])
def test_check_flatbuffer_refuses_bad_tolerances_before_running_anything(options, message):
    from bnn_keras.export import ExportError
    from bnn_keras.export.verify import check_flatbuffer

    with pytest.raises(ExportError, match=f"^{message}$"):  # no model and no file: nothing is run
        check_flatbuffer(None, b"", "lce", None, "given", min_top1=0.99, max_abs_diff=None, **options)
