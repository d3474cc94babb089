"""Validation before anything compiles: a mask ratio that hides no patch (or every patch) of the model,
and one message, the same wherever it is caught, for one-class fine-tuning data."""

import os
import re

from absl import flags
import pytest

from gmae_jax import config_lib, stages
from gmae_jax.data import synthetic
from gmae_jax.stages import finetune

flags.FLAGS.mark_as_parsed()

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load(name):
    return config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), name, "runlocal")


@pytest.mark.parametrize("ratio, hidden", [(1e-17, 0), (0.995, 64)])  # keeps int(64 * (1 - ratio))
def test_a_mask_ratio_that_hides_no_patch_or_every_patch_is_refused(ratio, hidden, tmp_path):
    config = load("pretrain")  # micro: 32 px / 4 px patches = 64 patches
    config.data.root, config.mask_ratio = str(tmp_path), ratio
    message = (f"config.mask_ratio={ratio} hides {hidden} of the model's 64 patches (config.model.img_size=32 / "
               "patch_size=4); choose a ratio in [0.0157, 0.9843]")
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        stages.validate(config)


def test_the_bounds_of_the_mask_ratio_range_are_accepted(tmp_path):
    config = load("pretrain")
    config.data.root = str(tmp_path)
    for ratio in (1 / 64, 63 / 64, 0.0157, 0.9843):  # exact, and as the message above prints them
        config.mask_ratio = ratio
        stages.validate(config)


def test_one_class_gets_the_same_message_from_the_config_and_from_the_data(tmp_path):
    config = load("finetune")
    config.data.root = str(tmp_path)
    config.num_classes = 1
    with pytest.raises(config_lib.ConfigError, match=f"config.num_classes=1 must be at least 2: {finetune.ONE_CLASS}") as from_config:
        stages.validate(config)

    synthetic.write_demo_dataset(str(tmp_path), image_size=32, train_per_class=2, val_per_class=1, classes=("fist",))
    config.num_classes = 2
    with pytest.raises(config_lib.ConfigError, match=f"has one class \\(fist\\): {finetune.ONE_CLASS}") as from_data:
        finetune.open_data(config)
    for error in (from_config, from_data):
        assert "num_classes=1;" not in str(error.value) and "set --config.num_classes" not in str(error.value)
