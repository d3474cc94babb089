"""Pictures: the confusion matrix counts and both images are written."""

import numpy as np
import pytest
from PIL import Image

from gmae_jax import metrics, visualize


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    matrix = metrics.confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [0, 1, 0]])


def test_confusion_matrix_picture_fits_its_caption(tmp_path):
    path = tmp_path / "cm.png"
    visualize.save_confusion_matrix(np.eye(2, dtype=int) * 5, ["a", "b"], str(path))
    assert Image.open(path).width > 200  # the caption sets the width, not the 95 px of two cells


def test_reconstruction_rows_paste_visible_patches_back(tmp_path):
    images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    mask = np.array([[True, False, False, True]] * 2)
    pred = np.zeros((2, 4, 48), np.float32)
    rows = visualize.reconstruction_rows(images, mask, pred, 4, norm_pix_loss=False)
    assert rows.shape == (2, 4, 8, 8, 3)
    np.testing.assert_array_equal(rows[:, 0], images)
    np.testing.assert_array_equal(rows[:, 1, :4, :4], 0.0)  # patch 0 is masked out of the input
    np.testing.assert_array_equal(rows[:, 2], 0.0)  # every patch as predicted (zeros here)
    np.testing.assert_array_equal(rows[:, 3, :4, 4:], images[:, :4, 4:])  # patch 1 is visible
    np.testing.assert_array_equal(rows[:, 3, :4, :4], 0.0)  # patch 0 is masked: the prediction
    visualize.save_reconstructions(rows, str(tmp_path / "r.png"))
    picture = Image.open(tmp_path / "r.png")
    assert picture.size == ((4 * 10 + 2) * 4, (2 * 10 + 2) * 4)
    assert len(np.unique(np.asarray(picture.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # not blank


def test_a_perfect_norm_pix_prediction_draws_the_original_patches():
    """The loss normalises each patch with the unbiased variance; the picture must undo exactly that
    (the biased one drew predictions ~1 % low in contrast at patch 4)."""
    from gmae_jax.train import losses

    images = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    mask = np.array([[True, False, False, True]] * 2)
    perfect = np.asarray(losses.reconstruction_targets(images, 4, norm_pix_loss=True))
    rows = visualize.reconstruction_rows(images, mask, perfect, 4, norm_pix_loss=True)
    np.testing.assert_allclose(rows[:, 2], images, atol=1e-5)


def test_a_picture_cut_off_mid_write_leaves_the_old_one_whole(tmp_path, monkeypatch):
    path = tmp_path / "confusion_matrix.png"
    visualize.save_confusion_matrix(np.eye(2, dtype=int) * 5, ["a", "b"], str(path))
    before = path.read_bytes()

    def killed_mid_write(self, f, format=None, **params):
        f.write(b"\x89PNG\r\n\x1a\n half a picture")
        raise KeyboardInterrupt  # as a kill or Ctrl-C lands: mid-write

    monkeypatch.setattr(Image.Image, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        visualize.save_confusion_matrix(np.eye(2, dtype=int) * 7, ["a", "b"], str(path))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["confusion_matrix.png"]  # no temporary file left
