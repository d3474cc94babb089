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
    visualize.save_reconstructions(rows, str(tmp_path / "r.png"), "step 7; mask ratio 0.5")
    picture = np.asarray(Image.open(tmp_path / "r.png").convert("RGB"))
    # 8 px images + 2 px gaps, x4 (small images are upscaled), a row of column names above, the caption below.
    grid_height = (2 * 10 + 2) * 4
    assert picture.shape == (16 + grid_height + 16, (4 * 10 + 2) * 4, 3)
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 10  # not blank
    for text_row in (picture[:16], picture[16 + grid_height:]):  # words drawn: dark pixels on white
        assert (text_row.min(axis=2) < 100).sum() > 20


def test_a_long_caption_wraps_and_large_images_are_not_upscaled(tmp_path):
    rows = np.zeros((1, 4, 224, 224, 3), np.float32)
    visualize.save_reconstructions(rows, str(tmp_path / "r.png"), "word " * 200)
    width, height = Image.open(tmp_path / "r.png").size
    assert width == 4 * 226 + 2 and height > 16 + 228 + 16 * 3


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


def test_reconstructions_come_from_across_the_split_not_its_first_class():
    from gmae_jax.train.tasks import spread_over

    listed_by_class = np.arange(40)  # 4 classes of 10, in order, as class folders list them
    picked = spread_over(np.random.default_rng(0).permutation(listed_by_class), 8)  # in any evaluated order
    assert picked.tolist() == [0, 6, 11, 17, 22, 28, 33, 39] and len(set(picked // 10)) == 4
    assert spread_over(np.array([5, 3]), 8).tolist() == [3, 5]  # fewer images than rows: each once


def test_the_evaluation_pictures_say_which_step_they_show(tmp_path):
    matrix = np.eye(2, dtype=int) * 5
    visualize.save_confusion_matrix(matrix, ["a", "b"], str(tmp_path / "plain.png"))
    visualize.save_confusion_matrix(matrix, ["a", "b"], str(tmp_path / "step.png"), step=123456)
    assert Image.open(tmp_path / "step.png").width > Image.open(tmp_path / "plain.png").width  # a longer footer
    tile = [np.zeros((8, 8, 3), np.uint8)]
    visualize.save_prediction_sheet(tile, [["x"]], [False], str(tmp_path / "bare.png"))
    visualize.save_prediction_sheet(tile, [["x"]], [False], str(tmp_path / "titled.png"), title="step 3: 1 of 1")
    titled = np.asarray(Image.open(tmp_path / "titled.png").convert("L"))
    assert titled.shape[0] == np.asarray(Image.open(tmp_path / "bare.png")).shape[0] + 16
    assert (titled[:16] < 100).sum() > 10  # the title's words


def test_class_names_in_other_scripts_are_drawn_not_boxes():
    """Class names are folder names: 'ладонь' printed as six missing-glyph boxes in every picture."""
    font = visualize._font()
    missing = np.asarray(font.getmask("\ue000"))  # a private-use code point: no font draws it
    for letter in ("л", "ж", "ψ"):
        assert not np.array_equal(np.asarray(font.getmask(letter)), missing), letter


def test_a_caption_line_with_a_newline_is_drawn_escaped(tmp_path):
    """File names may hold control characters; a caption line is one line (PIL cannot measure more)."""
    image = np.full((8, 8, 3), 128, np.uint8)
    name = visualize.file_label("/data/val/fist/new\nline.jpg")
    visualize.save_prediction_sheet([image, image], [[name, "fist 0.90"], ["tab\there.jpg", "one 0.5"]],
                                    [True, None], str(tmp_path / "sheet.png"), title="a\nb")
    assert Image.open(tmp_path / "sheet.png").width > 0
    font = visualize._font()
    draw = visualize.ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert visualize._fit(draw, name, 1000, font) == "fist/new\\nline.jpg"
    # Every word of a wrapped caption, not only a line's first; other scripts' joiners are no control characters.
    assert visualize._wrap(draw, "title a\x07b c\x00d", 1000, font) == ["title a\\x07b c\\x00d"]
    assert visualize._fit(draw, "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", 1000, font) == (
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645")
