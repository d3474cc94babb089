"""Classification metrics from a confusion matrix: accuracy, per-class precision / recall / F1,
macro and support-weighted F1, and the table a person reads them in. Numpy only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (a class never predicted or absent)."""
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (true class, predicted class)."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def classification_metrics(matrix: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Metrics of a (true class, predicted class) count matrix, flat for metrics files and loggers:
    accuracy, macro_f1, weighted_f1, and precision/<class>, recall/<class>, f1/<class>,
    support/<class>. Macro F1 averages the classes that occur as a label or a prediction (as
    scikit-learn does by default); weighted F1 weights each class by its number of labels."""
    matrix = np.asarray(matrix, np.float64)
    true_positive, support, predicted = matrix.diagonal(), matrix.sum(axis=1), matrix.sum(axis=0)
    precision, recall = _ratio(true_positive, predicted), _ratio(true_positive, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    present = (support > 0) | (predicted > 0)
    result = {
        "accuracy": float(true_positive.sum() / max(matrix.sum(), 1.0)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "weighted_f1": float((f1 * support).sum() / max(support.sum(), 1.0)),
    }
    for i, name in enumerate(class_names):
        result |= {f"precision/{name}": float(precision[i]), f"recall/{name}": float(recall[i]),
                   f"f1/{name}": float(f1[i]), f"support/{name}": float(support[i])}
    return result


def per_class_table(metrics: dict[str, float], class_names: Sequence[str]) -> str:
    """Per-class precision, recall, F1 and support as aligned text, with the averages below."""
    width = max([len(name) for name in class_names] + [len("top-5 accuracy")])
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for name in class_names:
        lines.append(f"{name:<{width}}  {metrics[f'precision/{name}']:9.3f}  {metrics[f'recall/{name}']:6.3f}  "
                     f"{metrics[f'f1/{name}']:5.3f}  {int(metrics[f'support/{name}']):7d}")
    total = int(sum(metrics[f"support/{name}"] for name in class_names))
    lines.append(f"{'accuracy':<{width}}  {'':9}  {'':6}  {metrics['accuracy']:5.3f}  {total:7d}")
    if "top5_accuracy" in metrics:  # classifiers of more than 5 classes
        lines.append(f"{'top-5 accuracy':<{width}}  {'':9}  {'':6}  {metrics['top5_accuracy']:5.3f}  {total:7d}")
    lines.append(f"{'macro avg':<{width}}  {'':9}  {'':6}  {metrics['macro_f1']:5.3f}  {total:7d}")
    lines.append(f"{'weighted avg':<{width}}  {'':9}  {'':6}  {metrics['weighted_f1']:5.3f}  {total:7d}")
    return "\n".join(lines)
