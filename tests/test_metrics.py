"""Classification metrics against values worked out by hand on a small confusion matrix."""

import pytest

from gmae_jax import metrics

# rows: true class, columns: predicted. Class 'd' is neither a label nor a prediction.
MATRIX = [[5, 1, 0, 0],
          [2, 3, 1, 0],
          [0, 0, 4, 0],
          [0, 0, 0, 0]]
NAMES = ["a", "b", "c", "d"]


def test_metrics_match_hand_computed_values():
    m = metrics.classification_metrics(MATRIX, NAMES)
    # a: precision 5/7, recall 5/6, F1 10/13; b: 3/4, 1/2, 3/5; c: 4/5, 1, 8/9.
    assert m["precision/a"] == pytest.approx(5 / 7) and m["recall/a"] == pytest.approx(5 / 6)
    assert m["f1/a"] == pytest.approx(10 / 13)
    assert (m["precision/b"], m["recall/b"], m["f1/b"]) == pytest.approx((3 / 4, 1 / 2, 3 / 5))
    assert (m["precision/c"], m["recall/c"], m["f1/c"]) == pytest.approx((4 / 5, 1.0, 8 / 9))
    assert (m["precision/d"], m["recall/d"], m["f1/d"], m["support/d"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["accuracy"] == pytest.approx(12 / 16)
    assert m["macro_f1"] == pytest.approx((10 / 13 + 3 / 5 + 8 / 9) / 3)  # 'd' never occurs: left out
    assert m["weighted_f1"] == pytest.approx((6 * 10 / 13 + 6 * 3 / 5 + 4 * 8 / 9) / 16)


def test_a_class_predicted_but_absent_counts_in_the_macro_average():
    m = metrics.classification_metrics([[1, 1], [0, 0]], ["x", "y"])
    assert m["f1/y"] == 0.0 and m["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert m["weighted_f1"] == pytest.approx(2 / 3)


def test_table_lists_every_class_and_the_averages():
    table = metrics.per_class_table(metrics.classification_metrics(MATRIX, NAMES), NAMES)
    lines = table.splitlines()
    assert lines[0].split() == ["class", "precision", "recall", "f1", "support"]
    assert lines[1].split() == ["a", "0.714", "0.833", "0.769", "6"]
    assert lines[-3].split() == ["accuracy", "0.750", "16"]
    assert [line.split()[0] for line in lines[1:5]] == NAMES
    assert not any(line.startswith("top-5") for line in lines)  # only where the metrics have it

    with_top5 = metrics.per_class_table(
        {**metrics.classification_metrics(MATRIX, NAMES), "top5_accuracy": 0.9375}, NAMES)
    assert with_top5.splitlines()[-3].split() == ["top-5", "accuracy", "0.938", "16"]
