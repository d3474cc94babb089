"""Configs: variants, overrides, and one clear error per bad value."""

import ast
import glob
import logging
import os
import re
import subprocess
import sys

import pytest

from gmae_jax import config_checks, config_lib, stages

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def load(name: str, arg: str | None = None):
    return config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), name, arg)


def test_every_config_file_is_data_that_loads_without_starting_jax():
    """Configs are data: reading one (a launcher, a sweep tool, `--config.x` parsing) costs no JAX start-up."""
    names = sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(CONFIGS, "*.py")))
    assert {"pretrain", "finetune", "prepare", "evaluate", "predict", "export", "import", "study", "demo"} <= set(names)
    script = ("import os, sys\nfrom gmae_jax import config_lib\n"
              f"for name in {names!r}:\n"
              f"    config_lib.load_sibling_config(os.path.join({CONFIGS!r}, 'x.py'), name)\n"
              "print(sorted(m for m in ('jax', 'flax', 'orbax', 'grain', 'torch') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(CONFIGS))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_pretrain_defaults_follow_the_original_recipe():
    config = load("pretrain")
    assert (config.mask_ratio, config.batch_size, config.model.img_size, config.model.patch_size) == (0.6, 64, 224, 16)
    assert config.optim.weight_decay == 0.05
    assert load("finetune").optim.weight_decay == 0.01


def test_variant_selects_model_preset_and_runlocal():
    config = load("pretrain", "model=tiny")
    assert (config.model.preset, config.model.embed_dim, config.model.depth) == ("tiny", 128, 4)
    local = load("pretrain", "runlocal")
    assert local.model.preset == "micro" and local.total_steps == 20
    assert load("finetune").model.preset == "small"


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@pytest.mark.parametrize("variant", ["model=mini,runlocal", "runlocal,model=mini"])
def test_runlocal_keeps_the_model_the_variant_names(stage, variant):
    config = load(stage, variant)
    assert (config.model.preset, config.model.embed_dim, config.total_steps) == ("mini", 64, 20)


def test_the_study_hands_its_model_and_runlocal_to_both_recipes():
    config = load("study", "model=mini,runlocal")
    for recipe in (config.pretrain, config.finetune):
        assert (recipe.model.preset, recipe.total_steps) == ("mini", 20)
    assert load("study", "runlocal").pretrain.model.preset == "micro"
    assert load("study").finetune.model.preset == "small"


def test_unknown_variant_and_preset_are_errors():
    with pytest.raises(config_lib.ConfigError, match="unknown config variant 'modle'"):
        load("pretrain", "modle=tiny")
    with pytest.raises(config_lib.ConfigError, match="unknown model preset 'huge'"):
        load("pretrain", "model=huge")


@pytest.mark.parametrize("typed", ["runlocal=ture", "runlocal=2"])
def test_a_boolean_variant_that_is_neither_true_nor_false_is_an_error(typed):
    # Read as False, a typo would start the full run instead of the smoke run.
    assert load("pretrain", "runlocal=off").total_steps == 0 and load("pretrain", "runlocal=on").total_steps == 20
    with pytest.raises(config_lib.ConfigError, match=f"{typed.split('=')[1]}' is not true or false"):
        load("pretrain", typed)


@pytest.mark.parametrize("stage", ["evaluate", "export", "predict", "prepare"])
def test_a_variant_given_to_a_config_without_variants_is_an_error(stage):
    load(stage)
    with pytest.raises(config_lib.ConfigError, match="unknown config variant 'model'; this config file takes none"):
        load(stage, "model=small")


def test_the_demos_runlocal_shrinks_data_model_and_steps_but_keeps_its_recipe():
    demo, quick = load("demo"), load("demo", "runlocal")
    assert quick.labels_per_class <= quick.dataset.finetune_train_per_class
    assert quick.dataset.pretrain_train_per_class < demo.dataset.pretrain_train_per_class
    for recipe in ("pretrain", "finetune"):
        assert quick[recipe].model.preset == "micro" and quick[recipe].model.embed_dim == 32
        assert quick[recipe].total_steps == 20 < demo[recipe].total_steps
    assert quick.pretrain.model.mask_mode == demo.pretrain.model.mask_mode == "sparse"
    assert quick.finetune.best_metric == "" and quick.pretrain.mask_ratio == demo.pretrain.mask_ratio
    with pytest.raises(config_lib.ConfigError, match=r"unknown config variant 'model'; known: \['runlocal'\]"):
        load("demo", "model=small")


def set_field(config, field: str, value) -> None:
    """config.a.b = value for field 'a.b'."""
    *sections, name = field.split(".")
    for part in sections:
        config = config[part]
    config[name] = value


@pytest.fixture
def pretrain_config(tmp_path):
    config = load("pretrain", "runlocal")
    config.data.root = str(tmp_path)
    return config


def test_valid_config_passes(pretrain_config):
    stages.validate(pretrain_config)


@pytest.mark.parametrize("field,value,message", [
    ("mask_ratio", 1.0, r"config.mask_ratio=1.0 must be in \(0, 1\)"),
    ("mask_ratio", 0.0, r"config.mask_ratio=0.0 must be in \(0, 1\)"),
    ("model.img_size", 30, "img_size=30 is not divisible by config.model.patch_size=4"),
    ("model.num_heads", 3, "num_heads=3 does not divide config.model.embed_dim=32"),
    ("model.decoder_num_heads", 5, "decoder_num_heads=5 does not divide"),
    ("model.embed_dim", 40, "embed_dim=40 must be a multiple of 16"),
    ("model.mask_mode", "leaky", "mask_mode='leaky' is not one of"),
    ("model.conv_impl", "cudnn", "conv_impl='cudnn' is not one of"),
    ("data.root", "/no/such/folder", "data.root='/no/such/folder' does not exist"),
    ("optim.lr", 0.0, "optim.lr=0.0 must be positive"),
    ("batch_size", 0, "batch_size=0 must be positive"),
    ("log_every", 0, r"config.log_every=0 must be at least 1 \(the run logs and saves at its last step anyway"),
    ("checkpoint_every", 0, "config.checkpoint_every=0 must be at least 1"),
    ("eval_every", -1, r"config.eval_every=-1 must be 0 \(only at the end\) or more"),
    ("data.aug.crop_scale_min", 0.0, r"aug.crop_scale_min=0.0 must be in \(0, 1\]"),
    ("data.aug.saturation", -0.2, r"aug.saturation=-0.2 must be >= 0"),
    ("data.aug.hue", 0.6, r"aug.hue=0.6 must be in \[0, 0.5\]"),
    ("data.num_workers", -2, r"data.num_workers=-2 must be >= 0 \(0 = in this process\) or -1"),
    ("total_steps", -3, r"config.total_steps=-3 must be in \[0, 2\*\*31\) \(0 = from config.num_epochs\)"),
    ("total_steps", 2**31, r"config.total_steps=2147483648 must be in \[0, 2\*\*31\)"),
    ("num_epochs", float("inf"), "config.num_epochs=inf must be finite"),
    ("optim.lr", float("inf"), "config.optim.lr=inf must be positive and finite"),
    ("optim.weight_decay", float("inf"), "config.optim.weight_decay=inf must be finite"),
    ("model.mlp_ratio", 0.01, "config.model.mlp_ratio=0.01 must be finite and give MSC-FFN a hidden width of 3"),
    ("model.mlp_ratio", float("inf"), "config.model.mlp_ratio=inf must be finite"),
    ("model.attention_dropout", 1.5, r"config.model.attention_dropout=1.5 must be in \[0, 1\): a probability"),
    ("model.attention_dropout", float("nan"), r"config.model.attention_dropout=nan must be in \[0, 1\)"),
    ("model.patch_size", 32, "patch_size=32 makes one patch: masking needs one patch hidden and one visible"),
    ("num_reconstructions", 0, "config.num_reconstructions=0 must be at least 1"),
    ("data.train_split", "", "config.data.train_split is empty; name a split folder"),
    ("data.num_workers", 100000, "config.data.num_workers=100000 is more than 4 worker processes per core"),
    ("best_mode", "max", "config.best_mode='max' would keep the checkpoint of the worst loss; use --config.best_mode="),
    ("keep_checkpoints", 0, "config.keep_checkpoints=0 must be at least 1: the latest checkpoint is what"),
    ("keep_checkpoints", -1, "config.keep_checkpoints=-1 must be at least 1"),
    ("optim.warmup_steps", -5, r"config.optim.warmup_steps=-5 must be >= 0"),
    ("optim.min_lr", 1.0, r"config.optim.min_lr=1.0 must be in \[0, config.optim.lr="),
    ("data.crop_scale_max", 0.5, "config.data.crop_scale_max=0.5 must be >= 1"),
    ("data.crop_scale_max", float("inf"), "config.data.crop_scale_max=inf must be >= 1 and finite"),
    ("data.aug.brightness", float("inf"), "config.data.aug.brightness=inf must be >= 0 and finite"),
    ("data.no_gesture_prob", 2.0, r"config.data.no_gesture_prob=2.0 must be in \[0, 1\]"),
    ("data.v1_val_fraction", 0.0, r"config.data.v1_val_fraction=0.0 must be in \(0, 1\)"),
    ("data.v1_val_fraction", 1.0, r"config.data.v1_val_fraction=1.0 must be in \(0, 1\)"),
    ("data.max_bad_images", -1, "config.data.max_bad_images=-1 must be >= 0"),
    ("model.patch_size", 0, "config.model.patch_size=0 must be positive"),
    ("model.img_size", 0, "config.model.img_size=0 must be positive"),
    ("model.num_heads", 0, "config.model.num_heads=0 must be positive"),
    ("model.embed_dim", 0, "config.model.embed_dim=0 must be positive"),
    ("model.decoder_embed_dim", 0, "config.model.decoder_embed_dim=0 must be positive"),
    ("model.mlp_ratio", 0.0, "config.model.mlp_ratio=0.0 must be positive"),
    ("model.depth", 0, "config.model.depth=0 must be positive"),
    ("model.decoder_depth", -1, "config.model.decoder_depth=-1 must be >= 0"),
    ("model.in_channels", 1, "config.model.in_channels=1: the input pipeline hands on RGB images"),
    ("model.dtype", "float16", "config.model.dtype='float16' does not run on CPU"),
    ("seed", -1, r"config.seed=-1 must be a whole number in \[0, 2\*\*32\)"),
    ("seed", 2**32, r"config.seed=4294967296 must be a whole number in \[0, 2\*\*32\)"),
    ("data.split_seed", -1, r"config.data.split_seed=-1 must be a whole number in \[0, 2\*\*32\)"),
    ("optim.b1", 1.0, r"config.optim.b1=1.0 must be in \[0, 1\): AdamW's moment decay"),
    ("optim.b2", -0.1, r"config.optim.b2=-0.1 must be in \[0, 1\)"),
    ("batch_size", 12, "config.batch_size=12 is not divisible by the 8 devices x config.grad_accum_steps=1; use a "
                       "multiple of 8"),
])
def test_bad_values_raise_one_line_errors(pretrain_config, field, value, message):
    set_field(pretrain_config, field, value)
    with pytest.raises(config_lib.ConfigError, match=message) as error:
        stages.validate(pretrain_config)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("stage, field, value, message", [
    ("pretrain", "mask_ratio", 1.5, r"config.mask_ratio=1.5 must be in \(0, 1\)"),
    ("finetune", "label_smoothing", 1.0, r"config.label_smoothing=1.0 must be in \[0, 1\)"),
])
def test_a_bad_value_is_named_before_a_data_root_that_is_not_there_yet(stage, field, value, message):
    config = load(stage, "runlocal")
    config.data.root = "/no/such/folder"
    set_field(config, field, value)
    with pytest.raises(config_lib.ConfigError, match=message):
        stages.validate(config)


def test_a_data_root_that_is_a_file_is_named_as_one(pretrain_config, tmp_path):
    pretrain_config.data.root = str(tmp_path / "image.jpg")
    (tmp_path / "image.jpg").write_bytes(b"")
    with pytest.raises(config_lib.ConfigError, match=f"data.root='{tmp_path / 'image.jpg'}' is a file; point"):
        stages.validate(pretrain_config)


def test_the_entry_points_help_lists_every_stage_and_its_config_file():
    with open(os.path.join(CONFIGS, "..", "gmae_jax", "main.py")) as f:  # what --help prints first
        usage = ast.get_docstring(ast.parse(f.read()))
    listed = re.search(r"Stages \(one config file each in configs/\): (.*?)\. Variants", usage, re.S).group(1)
    assert sorted(re.sub(r" \(.*?\)", "", " ".join(listed.split())).split(", ")) == sorted(stages.STAGES)
    for name in stages.STAGES:
        assert os.path.isfile(os.path.join(CONFIGS, f"{name}.py")), name


def test_another_stage_named_in_a_stages_config_is_one_line(pretrain_config):
    pretrain_config.stage = "finetune"
    with pytest.raises(config_lib.ConfigError, match=r"config.stage='finetune' but the config lacks that stage's "
                                                     r"field .*num_classes.*; use configs/finetune.py rather than"):
        stages.validate(pretrain_config)


def test_finetune_class_count_is_validated(tmp_path):
    config = load("finetune", "runlocal")
    config.data.root = str(tmp_path)
    config.num_classes = 1
    with pytest.raises(config_lib.ConfigError, match="num_classes=1 must be at least 2"):
        stages.validate(config)


def test_demo_config_validates_without_its_data():
    config = load("demo")
    stages.validate(config)
    assert config.finetune.num_classes == len(config.dataset.classes) == 4
    assert config.pretrain.model.preset == config.finetune.model.preset == "mini"


@pytest.mark.parametrize("field, value, message", [
    ("dataset.classes", ("fist", "wave"), r"config.dataset.classes=\('fist', 'wave'\): choose two or more distinct"),
    ("dataset.classes", ("fist",), r"choose two or more distinct gestures the generator draws, from fist, one,"),
    ("labels_per_class", 500, r"config.labels_per_class=500 but the demo draws config.dataset.finetune_train_per_"),
    ("dataset.classes", ("fist,palm",), r"as a tuple: --config.dataset.classes=\"\('fist','palm'\)\""),
    ("dataset.image_size", 0, r"config.dataset.image_size=0 must be a whole number of at least 1"),
    ("dataset.pretrain_val_per_class", -3, r"config.dataset.pretrain_val_per_class=-3 must be a whole number"),
    ("dataset.image_size", 100000, r"config.dataset.image_size=100000 must be at most 1024"),
    # Set by the demo (or the study inside it) for every run: a value given here was replaced without a word.
    ("pretrain.data.root", "/my/images", r"config.pretrain.data.root='/my/images': the demo trains on the images it"),
    ("finetune.freeze_encoder", True, r"config.finetune.freeze_encoder=True is set by the study for each of its "
                                      r"runs; use --config.linear_probe"),
    ("finetune.seed", 9, r"config.finetune.seed=9 is set by the study for each of its runs; use --config.seeds"),
    ("finetune.labels_per_class", 3, r"config.finetune.labels_per_class=3 is set by the study .*--config.labels_per"),
    # Named as the demo's flags name it, before it draws its images.
    ("pretrain.batch_size", 12, r"^config.pretrain.batch_size=12 is not divisible by the 8 devices x "
                                r"config.pretrain.grad_accum_steps=1"),
])
def test_demo_refuses_what_it_cannot_draw_before_drawing(field, value, message):
    config = load("demo")
    set_field(config, field, value)
    with pytest.raises(config_lib.ConfigError, match=message):
        stages.validate(config)


def test_demo_refuses_an_unknown_framing_in_one_line():
    config = load("demo")
    config.dataset.framing = "closeup"
    with pytest.raises(config_lib.ConfigError, match="framing='closeup'; choose from scene, hand_crop"):
        stages.validate(config)


def test_a_classifier_is_ranked_by_metrics_its_evaluation_reports(tmp_path):
    config = load("finetune", "runlocal")
    config.update(num_classes=3, best_metric="top5_accuracy")
    config.data.root = str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match="top5_accuracy' needs more than 5 classes .*use accuracy"):
        stages.validate(config)
    config.update(best_metric="cross_entropy", best_mode="max")
    with pytest.raises(config_lib.ConfigError, match="worst cross_entropy; use --config.best_mode=min"):
        stages.validate(config)
    config.update(best_metric="", subset_seed=-1)
    with pytest.raises(config_lib.ConfigError, match=r"config.subset_seed=-1 must be a whole number"):
        stages.validate(config)


@pytest.mark.parametrize("field, value, message", [
    ("finetune.optim.lr", -1.0, r"^config.finetune.optim.lr=-1.0 must be positive"),
    ("pretrain.mask_ratio", 2.0, r"^config.pretrain.mask_ratio=2.0 must be in \(0, 1\), e.g. --config.pretrain.mask"),
    ("pretrain.data.aug.hue", 0.9, r"^config.pretrain.data.aug.hue=0.9 must be in"),
    ("data.aug.hue", 0.9, r"^config.data.aug.hue=0.9 must be in"),  # the study's own labelled data
    # Before the study pretrains, not when its first fine-tune starts.
    ("finetune.batch_size", 12, r"^config.finetune.batch_size=12 is not divisible by the 8 devices x "
                                r"config.finetune.grad_accum_steps=1"),
    ("labels_per_class", ("abc",), r"^config.labels_per_class=\('abc',\) must be whole numbers, e.g. '\(5,10,25,0\)'"),
])
def test_the_study_names_its_recipes_fields_as_its_flags_do(field, value, message, tmp_path):
    config = load("study", "runlocal")
    config.update(pretrain_data=str(tmp_path))
    config.data.root = str(tmp_path)
    set_field(config, field, value)
    with pytest.raises(config_lib.ConfigError, match=message):
        stages.validate(config)


def test_a_recipes_warnings_and_runtime_errors_name_the_outer_configs_flags():
    """The study's and the demo's sub-runs warn and fail as that config's flags name the fields
    (`--config.pretrain.total_steps`, the study's labelled `config.data`), not as the stage alone would."""
    from absl import logging as absl_logging

    from gmae_jax.train.divergence import TrainingDivergedError

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    keep = Keep()
    absl_logging.get_absl_logger().addHandler(keep)
    try:
        with config_checks.fields_named_under("finetune", {"data.": "data."}):
            absl_logging.warning("raise --config.total_steps; config.data.num_workers=%d; see run/config.json", 2)
        absl_logging.warning("after: --config.total_steps")
        with pytest.raises(TrainingDivergedError, match=r"^lower --config\.finetune\.optim\.lr$"):
            with config_checks.fields_named_under("finetune"):
                raise TrainingDivergedError("lower --config.optim.lr")
    finally:
        absl_logging.get_absl_logger().removeHandler(keep)
    assert records == ["raise --config.finetune.total_steps; config.data.num_workers=2; see run/config.json",
                       "after: --config.total_steps"]
