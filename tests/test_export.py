"""Export to PyTorch and import back (configs/export.py, configs/import.py): trained runs export
exactly, load with strict=True into the original-layout classes and compute what Flax computes; the
PyTorch-only path runs without JAX; import -> export is exact; bad files get one-line errors."""

import argparse
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from etils import epath
import safetensors.numpy
import torch
from PIL import Image

from gmae_jax import config_lib, stages
from gmae_jax.data import synthetic, views
from gmae_jax.models.gmae import GMAE
from gmae_jax.models.presets import PRESETS, GMSTConfig
from gmae_jax.stages import export, import_
from gmae_jax.torch_mirror import convert, export_format, modules as mirror, weight_files
from gmae_jax.train import checkpoint, init_from, resume_check, run_folder, setup, steps, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("fist", "one", "palm")
TOLERANCE = 1e-4


def load(name, arg=None):
    return config_lib.load_sibling_config(os.path.join(REPO, "configs", "x.py"), name, arg)


def relative_error(got, want):
    return float(np.max(np.abs(np.asarray(got) - np.asarray(want))) / np.max(np.abs(want)))


def snapshot(folder):
    """Every file under `folder` with its size and modification time."""
    return {os.path.join(d, f): (os.path.getsize(os.path.join(d, f)), os.path.getmtime(os.path.join(d, f)))
            for d, _, files in os.walk(folder) for f in files}


def load_pth(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def run_stage(name, workdir, **fields):
    config = load(name)
    config.update(fields)
    stages.validate(config)
    return stages.run(config, str(workdir))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthetic.write_demo_dataset(str(root), image_size=48, train_per_class=4, val_per_class=2, classes=CLASSES)
    paths = sorted(str(p) for p in (root / "val").rglob("*.jpg"))
    # The evaluation view the Flax side sees: what a PyTorch user's preprocessing must reproduce.
    images = np.asarray(steps.standardize(np.stack([views.predict_view(p, "original", 32).pixels for p in paths])))
    return root, paths, images


@pytest.fixture(scope="module")
def finetune(data, tmp_path_factory):
    """A 1-step fine-tune on 8 simulated devices with FSDP (parameters sharded), exported through
    the entry point in a subprocess that has one device. Returns (run dir, export dir, Flax logits
    of the val images, computed on the 8 devices)."""
    root, _, images = data
    run_dir = tmp_path_factory.mktemp("finetune")
    config = load("finetune", "runlocal")
    config.update(num_classes=len(CLASSES), total_steps=1, eval_every=0, checkpoint_every=1)
    config.data.root = str(root)
    config.mesh.update(data=4, fsdp=2)
    stages.run(config, str(run_dir))
    before = snapshot(run_dir)
    out = tmp_path_factory.mktemp("finetune_export")
    result = subprocess.run(
        [sys.executable, "-m", "gmae_jax.main", "--config=configs/export.py", f"--workdir={out}",
         f"--config.checkpoint_dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(run_dir) == before  # nothing written into the run it read
    restored = setup.restore_run(str(run_dir))
    variables = {"params": restored.weights.params, "batch_stats": restored.weights.batch_stats}
    logits = np.asarray(jax.jit(functools.partial(restored.model.apply, train=False))(variables, images))
    return run_dir, out, logits


@pytest.fixture(scope="module")
def pretrain(data, tmp_path_factory):
    """A 1-step pretraining run exported in-process. Returns (run dir, export dir)."""
    root, _, _ = data
    run_dir = tmp_path_factory.mktemp("pretrain")
    config = load("pretrain", "runlocal")
    config.update(total_steps=1, eval_every=0, checkpoint_every=1, mask_ratio=0.75, norm_pix_loss=True)
    config.data.root = str(root)
    stages.run(config, str(run_dir))
    out = tmp_path_factory.mktemp("pretrain_export")
    run_stage("export", out, checkpoint_dir=str(run_dir))
    return run_dir, out


@pytest.mark.slow
def test_finetune_export_loads_strict_into_the_original_classifier_and_matches_flax(finetune, data):
    run_dir, out, flax_logits = finetune
    payload = load_pth(out / "model.pth")
    assert set(payload) == {"model_state_dict", "extra_state_dict", "config", "class_names", "stage", "step"}
    assert payload["class_names"] == list(CLASSES) and payload["stage"] == "finetune" and payload["step"] == 1
    assert payload["extra_state_dict"] == {}
    config = json.loads((out / "config.json").read_text())
    assert config == payload["config"] and config["layout"] == "original"
    assert config["model"]["embed_dim"] == PRESETS["micro"]["embed_dim"] and config["num_classes"] == 3
    assert config["preprocessing"]["image_size"] == 32 and config["preprocessing"]["channel_order"] == "RGB"
    assert config["preprocessing"]["mean"] == [0.485, 0.456, 0.406] and config["preprocessing"]["std"] == [
        0.229, 0.224, 0.225]

    gmst = export_format.original_layout(export_format.model_config(config))
    model = mirror.GMAEForClassification(gmst, len(CLASSES)).eval()
    model.load_state_dict(payload["model_state_dict"], strict=True)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(data[2].transpose(0, 3, 1, 2))).numpy()
    assert relative_error(torch_logits, flax_logits) < TOLERANCE

    tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
    assert tensors.keys() == payload["model_state_dict"].keys()
    for key, value in payload["model_state_dict"].items():
        np.testing.assert_array_equal(tensors[key], value.numpy(), err_msg=key)
    encoder = load_pth(out / "encoder.pth")
    mirror.GMSTEncoder(gmst).load_state_dict(encoder["encoder_state_dict"], strict=True)
    assert encoder["pos_embed"].shape == (1, gmst.num_patches, gmst.embed_dim)


@pytest.mark.slow
def test_pretrain_export_loads_strict_into_the_original_gmae_and_matches_flax(pretrain, data):
    run_dir, out = pretrain
    payload = load_pth(out / "model.pth")
    gmst = export_format.model_config(payload["config"])
    assert payload["stage"] == "pretrain" and gmst.mask_mode == "encoder"
    assert payload["config"]["pretraining"] == {"mask_ratio": 0.75, "norm_pix_loss": True}
    # No classifier, so no classes (the pretraining data's folder names are not its outputs).
    assert payload["class_names"] == payload["config"]["class_names"] == [] and payload["config"]["num_classes"] is None
    assert set(payload["extra_state_dict"]) == {"encoder_mask_token"}  # the original has no such tensor
    original = mirror.GMAE(export_format.original_layout(gmst)).eval()
    original.load_state_dict(payload["model_state_dict"], strict=True)

    restored = setup.restore_run(str(run_dir))
    variables = {"params": restored.weights.params, "batch_stats": restored.weights.batch_stats}
    images = data[2]
    no_mask = np.zeros((len(images), gmst.num_patches), bool)
    encode = jax.jit(functools.partial(restored.model.apply, train=False, method=GMAE.encode))
    flax_features = encode(variables, images, no_mask)
    with torch.no_grad():
        tokens, height, width = original.encoder.embed(torch.from_numpy(images.transpose(0, 3, 1, 2)))
        torch_features = original.encoder.encode(tokens + original.pos_embed, height, width).numpy()
    assert relative_error(torch_features, flax_features) < TOLERANCE

    # With the extras, the mirror's encoder-masking GMAE holds the whole pretraining model.
    mirror.GMAE(gmst).load_state_dict({**payload["model_state_dict"], **payload["extra_state_dict"]}, strict=True)
    # model.safetensors names its extras: without them, the original's strict load takes the rest.
    with open(out / "model.safetensors", "rb") as f:
        extra_keys = json.loads(export_format.safetensors_metadata(f)["extra_keys"])
    assert extra_keys == ["encoder_mask_token"]
    tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
    original.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items() if k not in extra_keys}, strict=True)


PYTORCH_ONLY = textwrap.dedent("""
    import json, sys
    for name in ("jax", "jaxlib", "flax", "ml_collections", "absl", "grain", "orbax", "optax", "etils"):
        sys.modules[name] = None  # importing any of them now raises ImportError
    try:
        import jax
    except ImportError:
        pass
    else:
        raise SystemExit("jax imported")
    from gmae_jax.torch_mirror import exported
    model = exported.load(sys.argv[1])
    probs = model.classify(sys.argv[2:])
    print(json.dumps({"names": model.class_names, "probs": probs.tolist()}))
""")


@pytest.mark.slow
def test_pytorch_only_inference_runs_without_jax(finetune, data):
    _, out, flax_logits = finetune
    result = subprocess.run([sys.executable, "-c", PYTORCH_ONLY, str(out), *data[1]], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["names"] == list(CLASSES)
    flax_probs = jax.nn.softmax(flax_logits, axis=-1)
    np.testing.assert_allclose(answer["probs"], flax_probs, rtol=TOLERANCE, atol=1e-6)


@pytest.fixture(scope="module")
def imported(finetune, pretrain, tmp_path_factory):
    """Both exports imported back into run folders."""
    folders = {}
    for stage, (_, out, *_) in (("finetune", finetune), ("pretrain", pretrain)):
        folders[stage] = tmp_path_factory.mktemp(f"imported_{stage}")
        run_stage("import", folders[stage], path=str(out / "model.pth"))
    return folders


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_import_then_export_is_an_exact_round_trip(stage, finetune, pretrain, imported, tmp_path):
    first = load_pth(({"finetune": finetune, "pretrain": pretrain}[stage])[1] / "model.pth")
    run_stage("export", tmp_path, checkpoint_dir=str(imported[stage]))
    second = load_pth(tmp_path / "model.pth")
    for part in ("model_state_dict", "extra_state_dict"):
        assert second[part].keys() == first[part].keys()
        for key, value in first[part].items():
            assert torch.equal(second[part][key], value), key
    assert (second["class_names"], second["stage"], second["step"]) == (first["class_names"], stage, 1)
    # The pretraining loss's settings and conv_impl included; the run exported is the imported one.
    assert second["config"] == {**first["config"], "run": os.path.abspath(imported[stage])}
    assert first["config"]["gmae_jax_model"]["conv_impl"] == "auto"  # as configured, not as resolved here
    if stage == "pretrain":  # evaluated as it was trained
        run = run_folder.load_run_config(str(imported[stage]))
        assert (run.mask_ratio, run.norm_pix_loss) == (0.75, True)
    with pytest.raises(config_lib.ConfigError, match=r"was imported \(one checkpoint, ranked by no evaluation\), so "
                       "it has no 'best' checkpoint; use --config.checkpoint=latest"):
        setup.restore_run(str(imported[stage]), "best")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_training_in_an_imported_run_says_to_fine_tune_from_it(stage, imported):
    """A resume of an imported run (no optimiser state) was refused for its recipe (made-up defaults),
    then, with resume_policy=allow_changes, for its checkpoint: neither hint led anywhere."""
    config = load(stage, "runlocal")
    config.resume_policy = "allow_changes"
    run = str(imported[stage])
    before = snapshot(run)
    with pytest.raises(config_lib.ConfigError, match=re.escape(
            f"{run} holds a run the import stage wrote: weights only, with no optimiser state or data position to "
            f"resume, so no training continues it; fine-tune from it")) as error:
        resume_check.check(config, run, list(CLASSES))
    assert f"with configs/finetune.py --config.init_from={run} and a new --workdir" in str(error.value)
    assert ("the classifier head starts anew" in str(error.value)) == (stage == "finetune")
    assert snapshot(run) == before


@pytest.mark.slow
def test_import_of_our_safetensors_file_reads_its_config_and_classes(finetune, tmp_path):
    run_dir, out, _ = finetune
    run_stage("import", tmp_path / "run", path=str(out / "model.safetensors"))
    back, trained = setup.restore_run(str(tmp_path / "run")), setup.restore_run(str(run_dir))
    assert back.class_names == list(CLASSES) and back.step == 1
    for got, want in zip(jax.tree.leaves(back.weights.params), jax.tree.leaves(trained.weights.params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(config_lib.ConfigError, match="carries its class names .*; drop --config.class_names"):
        run_stage("import", tmp_path / "other", path=str(out / "model.pth"), class_names="a,b,c")


@pytest.mark.slow
def test_an_export_folder_where_a_run_is_wanted_says_to_import_it(pretrain):
    _, out = pretrain
    with pytest.raises(config_lib.ConfigError, match=rf"{out} is an export \(PyTorch weights\), not a run: import it "
                       rf"first \(--config=configs/import.py --config.path={out}/model.pth"):
        setup.restore_run(str(out))


def test_imported_runs_feed_evaluate_and_init_from(finetune, pretrain, imported, data, tmp_path):
    # An imported run saw no data here: evaluating it asks for the images (none are guessed).
    with pytest.raises(config_lib.ConfigError, match=r"the run names no data root \(it was imported\); pass "
                       r"--config.data_root=FOLDER"):
        run_stage("evaluate", tmp_path / "refused", checkpoint_dir=str(imported["finetune"]), num_workers=0)
    # evaluate reads the imported classifier like any run, and scores what the trained run scores.
    metrics = run_stage("evaluate", tmp_path / "eval", checkpoint_dir=str(imported["finetune"]),
                        data_root=str(data[0]), num_workers=0, batch_size=8)
    assert metrics["checkpoint_step"] == 1
    trained = setup.restore_run(str(finetune[0]))
    back = setup.restore_run(str(imported["finetune"]))
    for got, want in zip(jax.tree.leaves(back.weights), jax.tree.leaves(trained.weights)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    # A fine-tune with init_from = the imported pretraining run starts from the file's encoder.
    config = load("finetune", "runlocal")
    config.num_classes = len(CLASSES)
    model, inputs = setup.build_model(config)
    # What the trainer hands over, as shapes and shardings: load_pretrained_encoder reads no values of it.
    template = setup.abstract_weights(model, inputs, trainer.make_mesh(config))
    state = init_from.load_pretrained_encoder(template, str(imported["pretrain"]))
    payload = load_pth(pretrain[1] / "model.pth")
    from_file = convert.torch_to_flax_variables(
        {**payload["model_state_dict"], **payload["extra_state_dict"]}, model="pretrain")
    for got, want in ((state.params["encoder"], from_file["params"]["encoder"]),
                      (state.params["pos_embed"], from_file["params"]["pos_embed"]),
                      (state.batch_stats["encoder"], from_file["batch_stats"]["encoder"])):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), b)


def micro(**overrides) -> GMSTConfig:
    return GMSTConfig(**{**PRESETS["micro"], **overrides})


def test_import_of_the_originals_checkpoint_file(tmp_path, capsys):
    """A checkpoint as the original's training script saves it (optimizer state and all)."""
    torch.manual_seed(0)
    original = mirror.GMAE(micro(mask_mode="original"))
    state_dict = original.state_dict()
    path = tmp_path / "best_model.pth"
    optimizer = torch.optim.AdamW(original.parameters())
    torch.save({"model_state_dict": state_dict, "optimizer_state_dict": optimizer.state_dict(),
                "scheduler_state_dict": {}, "epoch": 7, "loss": 0.25}, path)
    run_stage("import", tmp_path / "run", path=str(path), model=config_lib.model_section("micro"))
    restored = setup.restore_run(str(tmp_path / "run"))
    assert restored.config.stage == "pretrain" and restored.config.model.mask_mode == "original"
    want = convert.torch_to_flax_variables(state_dict, model="pretrain")
    for got, expected in zip(jax.tree.leaves(restored.weights.params), jax.tree.leaves(want["params"])):
        np.testing.assert_array_equal(np.asarray(got), expected)

    # Its export names why it describes the centre crop: the file it came from named no view.
    run_stage("export", tmp_path / "exported", checkpoint_dir=str(tmp_path / "run"))
    notice = "notice: the run records no evaluation view (the file it was imported from named none)"
    assert notice in capsys.readouterr().out
    # A pretraining model has no classes to name.
    with pytest.raises(config_lib.ConfigError, match=r"best_model.pth is a pretraining model \(no classifier head\): "
                       r"it has no classes; drop --config.class_names"):
        run_stage("import", tmp_path / "named", path=str(path), model=config_lib.model_section("micro"),
                  class_names="a,b")
    assert not (tmp_path / "named").exists()

    # Its pos_embed was trained after the encoder: a fine-tune from it keeps its own, as the original's does.
    config = load("finetune", "runlocal")
    config.update(num_classes=3, model=config_lib.model_section("micro"))
    model, inputs = setup.build_model(config)
    template = setup.abstract_weights(model, inputs, trainer.make_mesh(config))
    state = init_from.load_pretrained_encoder(template, str(tmp_path / "run"))
    assert state.params["pos_embed"] is template.params["pos_embed"]
    for got, expected in zip(jax.tree.leaves(state.params["encoder"]), jax.tree.leaves(want["params"]["encoder"])):
        np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize("asked, has_token, implied", [
    ("encoder", False, "original"), ("sparse", False, "sparse"), ("encoder", True, "encoder"),
    ("original", True, "encoder")])
def test_an_original_files_mask_mode_comes_from_its_keys_or_the_sparse_mode_asked_for(asked, has_token, implied):
    config = ml_collections.ConfigDict({"model": config_lib.model_section("micro")})
    config.model.mask_mode = asked
    state = {"encoder_mask_token": np.zeros((1, 1, 8))} if has_token else {}
    assert import_.imported_model({}, config, state).mask_mode == implied


def classifier_file(tmp_path, change=None):
    torch.manual_seed(0)
    state_dict = mirror.GMAEForClassification(micro(), 3).state_dict()
    if change:
        change(state_dict)
    path = tmp_path / "classifier.pth"
    torch.save({"model_state_dict": state_dict}, path)
    return path


class Pickled:
    def __reduce__(self):
        return (os.system, ("echo pickled code ran",))


def test_a_state_dict_saved_from_data_parallel_imports_without_its_module_prefix(tmp_path):
    plain = weight_files.read_pth(str(classifier_file(tmp_path)))["model_state_dict"]
    wrapped = {f"module.{name}": torch.from_numpy(value) for name, value in plain.items()}
    torch.save(wrapped, tmp_path / "ddp.pth")  # a bare state_dict of a DistributedDataParallel model
    read = weight_files.read_pth(str(tmp_path / "ddp.pth"))["model_state_dict"]
    assert list(read) == list(plain)
    for name, value in plain.items():
        np.testing.assert_array_equal(read[name], value)


@pytest.mark.parametrize("save", [
    lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3},  # a training script's
    lambda sd: {"state_dict": sd},
    lambda sd: {"model": sd, "args": argparse.Namespace(lr=1e-3, epochs=3)},  # a script's arguments beside it
    lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},  # saved from a torch.compile'd model
    lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},  # ... inside DistributedDataParallel
    lambda sd: {k: v.requires_grad_(v.is_floating_point()) for k, v in sd.items()},  # state_dict(keep_vars=True)
])
def test_state_dicts_as_training_scripts_save_them_import(save, tmp_path):
    """Each was refused ('holds neither a state_dict ...'), blamed on the model's sizes, or a traceback."""
    plain = weight_files.read_pth(str(classifier_file(tmp_path)))["model_state_dict"]
    torch.save(save({name: torch.from_numpy(value.copy()) for name, value in plain.items()}), tmp_path / "saved.pth")
    read = weight_files.read_pth(str(tmp_path / "saved.pth"))["model_state_dict"]
    assert list(read) == list(plain)
    for name, value in plain.items():
        np.testing.assert_array_equal(read[name], value)


def test_a_training_checkpoint_is_read_without_its_optimiser_state_in_memory(tmp_path):
    """The original's checkpoints carry AdamW's state, twice the weights: an import maps the file and
    reads the weights alone (it read the whole file into memory and unpickled a second copy: ~31 GB for
    `reference`'s 15.6 GB file)."""
    path = tmp_path / "checkpoint.pth"
    torch.save({"model_state_dict": {"w": torch.ones(4)},
                "optimizer_state_dict": {"state": {0: {"exp_avg": torch.zeros(64 * 2**20)}}}}, path)  # 256 MB
    code = ("import os, sys, torch\n"  # torch's own import is not the file's
            "from gmae_jax.torch_mirror import weight_files\n"
            "def resident_mb():\n"
            "    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGESIZE') >> 20\n"
            "before = resident_mb()\n"
            "payload = weight_files.read_pth(sys.argv[1])\n"  # held, as the import holds it while converting
            "print(payload['model_state_dict']['w'].tolist(), resident_mb() - before)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    weights, grown_mb = result.stdout.split("] ")
    assert weights == "[1.0, 1.0, 1.0, 1.0" and int(grown_mb) < 100, result.stdout + result.stderr[-2000:]


@pytest.mark.parametrize("kind", ["folder", "pipe", "broken link", "missing"])
def test_a_path_that_is_no_file_is_named(kind, tmp_path):
    path = tmp_path / "model.pth"
    if kind == "folder":
        path.mkdir()
    elif kind == "pipe":
        os.mkfifo(path)
    elif kind == "broken link":
        path.symlink_to(tmp_path / "gone.pth")
    message = (rf"^config.path={path} does not exist; give the \.pth \(or \.safetensors\) to import$"
               if kind == "missing" else
               rf"^config.path={path} is not a file \(a folder, a pipe, a link to nothing\?\); give a \.pth$")
    with pytest.raises(config_lib.ConfigError, match=message):
        weight_files.read_pth(str(path))


def test_files_that_hold_no_state_dict_say_what_they_hold_and_what_to_save(tmp_path):
    torch.manual_seed(0)
    model = mirror.GMAEForClassification(micro(), 3)
    torch.save(model, tmp_path / "module.pth")
    with pytest.raises(config_lib.ConfigError, match=r"it holds a pickled gmae_jax\.torch_mirror\.modules\."
                       r"GMAEForClassification, not only tensors; save the model's state_dict instead"):
        weight_files.read_pth(str(tmp_path / "module.pth"))
    torch.save({"encoder": model.encoder.state_dict(), "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(config_lib.ConfigError, match=r"holds a dict of 'encoder', 'epoch', and no state_dict under "
                       r"'model_state_dict', 'model', 'state_dict': save the model's state_dict"):
        weight_files.read_pth(str(tmp_path / "other.pth"))


@pytest.mark.parametrize("change,message", [
    (lambda payload: payload["config"]["gmae_jax_model"].update(new_field=1),
     r"its model has field\(s\) this version does not know: new_field; export the run again with this version"),
    (lambda payload: payload["config"]["gmae_jax_model"].update(embed_dim="32"),
     r"its model's embed_dim='32' is no int; export the run again"),
    (lambda payload: payload["config"].update(gmae_jax_model=None), r"its config has no gmae_jax_model section"),
    (lambda payload: payload.update(step=2**40), r"records step 1099511627776, which no run reaches"),
    (lambda payload: payload.update(class_names=["a", "b"]),
     r"carries 2 class names for a head of 3 outputs: a damaged or edited export; export the run again"),
])
def test_an_export_with_damaged_fields_is_one_line(change, message, finetune, tmp_path):
    """Each was a traceback (or contradictory advice); an export from a later version adding a model field
    reads as the first."""
    _, out, _ = finetune
    payload = torch.load(out / "model.pth", weights_only=True)
    change(payload)
    torch.save(payload, tmp_path / "model.pth")
    config = load("import")
    config.path = str(tmp_path / "model.pth")
    with pytest.raises(config_lib.ConfigError, match=message) as error:
        stages.run(config, str(tmp_path / "out"))
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_the_pytorch_only_loader_names_a_model_field_it_does_not_know(finetune, tmp_path):
    """A TypeError from the dataclass before (an export of a later version adding a model field)."""
    from gmae_jax.torch_mirror import exported
    _, out, _ = finetune
    shutil.copytree(out, tmp_path / "export")
    payload = torch.load(out / "model.pth", weights_only=True)
    payload["config"]["gmae_jax_model"]["new_field"] = 1
    torch.save(payload, tmp_path / "export" / "model.pth")
    with pytest.raises(ValueError, match=rf"{tmp_path}/export/model.pth: its model has field\(s\) this version does "
                       r"not know: new_field; export the run again with this version of gmae_jax"):
        exported.load(tmp_path / "export")


def test_import_and_export_never_write_inside_a_run(finetune, tmp_path):
    """Import wrote a run into another's checkpoints/ (which then passed for that run); export wrote over
    the config.json of a run whose checkpoints/ had been moved away, as the README says to do when none
    restores."""
    run_dir, out, _ = finetune
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    config = load("import")
    config.path = str(out / "model.pth")
    with pytest.raises(config_lib.ConfigError, match=rf"--workdir={copy}/checkpoints/new is inside the training run "
                       rf"{copy} \(its checkpoints/ is there\); import never writes into a run"):
        stages.run(config, str(copy / "checkpoints" / "new"))
    shutil.move(copy / "checkpoints", tmp_path / "moved_away")
    before = (copy / "config.json").read_bytes()
    with pytest.raises(config_lib.ConfigError, match=rf"--workdir={copy} holds a training run \(its config.json is "
                       r"a finetune run's\); the export never writes into a run"):
        run_stage("export", copy, checkpoint_dir=str(run_dir))
    assert (copy / "config.json").read_bytes() == before


@pytest.mark.parametrize("view", ["full_frame", "hand_crop"])
def test_an_export_describes_and_applies_the_runs_evaluation_view_and_import_keeps_it(finetune, data, view,
                                                                                      tmp_path):
    """A HaGRID run evaluated on letterboxed frames (or hand crops) exported the centre-crop recipe, so a
    PyTorch user fed it other pixels than it was trained on; and an import forgot the view."""
    run_dir, _, _ = finetune
    _, paths, _ = data
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    facts = json.loads((run / "run.json").read_text())
    assert facts[resume_check.VIEW] == "original"  # a class-folder run
    (run / "run.json").write_text(json.dumps({**facts, resume_check.VIEW: view}))

    run_stage("export", tmp_path / "out", checkpoint_dir=str(run))
    recipe = json.loads((tmp_path / "out" / "config.json").read_text())["preprocessing"]
    run_stage("import", tmp_path / "imported", path=str(tmp_path / "out" / "model.pth"))

    assert recipe["view"] == view
    # What the decode does beyond PIL's convert('RGB') is named, for a user who writes their own loader.
    assert "ImageOps.exif_transpose" in recipe["decode"]
    assert all(rule in recipe["to_rgb"] for rule in ("composited on black", "value >> 8", "x 255"))
    from gmae_jax.torch_mirror import exported
    for path in paths[:3]:
        seen_by_gmae_jax = steps.standardize(views.predict_view(path, view, 32, box=(0.0, 0.0, 1.0, 1.0)).pixels)
        np.testing.assert_allclose(exported.preprocess(path, recipe).numpy().transpose(1, 2, 0),
                                   np.asarray(seen_by_gmae_jax), atol=1e-5)
    assert resume_check.recorded_view(str(tmp_path / "imported")) == view
    assert (run_folder.load_run_config(str(tmp_path / "imported")).data.mode == "hand_crop") == (view == "hand_crop")


def test_an_export_cut_short_leaves_each_file_whole_and_no_config_json(pretrain, tmp_path, monkeypatch):
    """A re-export of another step cut short (a kill, a full disk) left model.safetensors of the new
    step beside model.pth and config.json of the old one: a folder that looked complete."""
    _, out = pretrain
    folder = tmp_path / "export"
    shutil.copytree(out, folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    payload = torch.load(folder / "model.pth", weights_only=True)
    state = {k: v.numpy() for k, v in payload["model_state_dict"].items()}
    extras = {k: v.numpy() for k, v in payload["extra_state_dict"].items()}

    def killed_half_way(obj, f):
        f.write(b"the first bytes of a model.pth")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        export.write_export(epath.Path(folder), state, extras, {**payload["config"], "step": 99})
    after = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert after["model.pth"] == before["model.pth"]
    assert set(after) == set(before) - {"config.json"}  # no temporary file left behind; visibly incomplete
    # ... and PyTorch-only loading refuses it, rather than hand back the older export's model.pth.
    from gmae_jax.torch_mirror import exported

    with pytest.raises(FileNotFoundError, match=r"config.json is missing: the export into .* did not finish"):
        exported.load(folder)


def test_an_export_replaces_only_an_exports_files(finetune, pretrain, tmp_path, capsys):
    """A folder of someone else's config.json / model.safetensors was overwritten without a word; an
    export of another run is replaced with a notice; a re-export cut short (no config.json) may go on."""
    foreign = tmp_path / "hf"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"architectures": ["BertModel"]}')
    (foreign / "model.safetensors").write_bytes(b"weights")
    before = snapshot(foreign)
    with pytest.raises(config_lib.ConfigError, match=r"holds config.json, model.safetensors, which no gmae_jax "
                                                     r"export wrote; the export would overwrite them"):
        run_stage("export", foreign, checkpoint_dir=str(pretrain[0]))
    assert snapshot(foreign) == before
    finetune_export = tmp_path / "finetune_export"
    shutil.copytree(finetune[1], finetune_export)
    assert json.loads((finetune_export / "config.json").read_text())["run"] == os.path.abspath(finetune[0])
    assert export.check_replaceable(str(finetune_export), str(finetune[0])) is None  # the same run again
    assert export.check_replaceable(str(finetune_export), str(pretrain[0])) == (
        f"notice: replacing the export of {os.path.abspath(finetune[0])} step 1 in {finetune_export}")
    (finetune_export / "config.json").unlink()  # as a re-export cut short leaves it: the safetensors says whose
    assert "replacing the export of" in export.check_replaceable(str(finetune_export), str(pretrain[0]))
    (finetune_export / "model.safetensors").unlink()  # model.pth alone: nothing says it is an export's
    with pytest.raises(config_lib.ConfigError, match="holds model.pth, encoder.pth, which no gmae_jax export"):
        export.check_replaceable(str(finetune_export), str(pretrain[0]))


@pytest.mark.parametrize("change,model,message", [
    (lambda sd: sd.pop("encoder.blocks.1.norm3.bias"), "micro", r"missing key 'encoder\.blocks\.1\.norm3\.bias'"),
    (lambda sd: sd.update(extra=torch.zeros(1)), "micro", r"extra key 'extra'"),
    (lambda sd: sd.update({"pos_embed": torch.zeros(1, 4, 32)}), "micro",
     r"key 'pos_embed' has shape \(1, 4, 32\) where the model has \(1, 64, 32\).*; set configs/import.py:"
     r"model=PRESET and --config.model.\* to the sizes the file was trained with$"),
    (None, "tiny", r"missing key 'encoder\.blocks\.2\.[^']+' \(and \d+ more\) for a classifier with "
                   r"img_size=224, patch_size=16, embed_dim=128, depth=4.*; its tensors fit the micro preset: "
                   r"configs/import.py:model=micro$"),
    (lambda sd: sd["encoder.blocks.0.attn.in_proj_weight"].fill_(float("nan")), "micro",
     r"tensor 'encoder\.blocks\.0\.attn\.in_proj_weight' holds NaN or infinite values"),
    (lambda sd: [sd.clear(), sd.update(a=torch.zeros(2), b=torch.ones(3))], "micro",  # not a G-MAE at all
     r"config.path=\S+: none of its 2 tensors \(a, b\) is one of G-MAE's \(e.g. '[^']+'\); give a checkpoint "
     r"of the original G-MAE code or of a gmae_jax export$"),
    (lambda sd: sd.update(code=Pickled()), "micro",
     r"does not load with torch.load\(weights_only=True\), which never runs pickled code: .*unsupported GLOBAL"),
])
def test_each_bad_file_gets_a_one_line_error(change, model, message, tmp_path):
    path = classifier_file(tmp_path, change)
    config = load("import", f"model={model}")
    config.update(path=str(path), class_names="fist,one,palm")
    with pytest.raises(config_lib.ConfigError, match=message) as error:
        stages.run(config, str(tmp_path / "out"))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"this is a text file\n", np.random.default_rng(0).bytes(5000)])
@pytest.mark.parametrize("name", ["model.pth", "model.safetensors"])
def test_files_that_are_no_checkpoint_get_a_one_line_error(content, name, tmp_path):
    path = tmp_path / name
    path.write_bytes(content)
    config = load("import", "model=micro")
    config.path = str(path)
    with pytest.raises(config_lib.ConfigError, match=rf"config.path={path} (does not load with torch.load|is not a "
                       r"readable .safetensors file)") as error:
        stages.run(config, str(tmp_path / "out"))
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_an_import_whose_checkpoint_fails_leaves_no_run_and_can_be_rerun(tmp_path, monkeypatch):
    config = load("import", "model=micro")
    config.update(path=str(classifier_file(tmp_path)), class_names="fist,one,palm")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        stages.run(config, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "config.json").exists()
    monkeypatch.undo()
    stages.run(config, str(tmp_path / "out"))  # the same command, once there is space
    assert setup.restore_run(str(tmp_path / "out")).class_names == ["fist", "one", "palm"]
    # Killed outright (SIGKILL: no cleanup) while saving, an import leaves its run files and an unfinished
    # step: the rerun says what that folder is and what to do, not that it holds a run.
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(tmp_path / "out" / "config.json", killed)
    (killed / "checkpoints" / "0.orbax-checkpoint-tmp-1").mkdir(parents=True)
    with pytest.raises(config_lib.ConfigError, match=r"holds a run's files but no saved checkpoint, as an import "
                       r"\(or a run\) killed before its first save leaves them: there are no weights in it; "
                       r"remove the folder"):
        stages.run(config, str(killed))


@pytest.mark.parametrize("name, make", [("checkpoints", "file"), ("classes.json", "folder"),
                                        ("config.json", "folder")])
def test_an_import_into_a_folder_with_a_run_file_of_the_other_kind_is_one_line_before_anything(tmp_path, name, make):
    """A `checkpoints` file would fail only at the save (orbax then waits minutes on its own thread)."""
    config = load("import", "model=micro")
    config.update(path=str(classifier_file(tmp_path)), class_names="fist,one,palm")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).mkdir() if make == "folder" else (out / name).touch()
    kind = "a folder" if make == "folder" else "no folder"
    with pytest.raises(config_lib.ConfigError, match=rf"{out / name} is {kind}, where the import writes a .* of "
                       "that name; move it away"):
        stages.run(config, str(out))
    assert sorted(p.name for p in out.iterdir()) == [name]


@pytest.mark.parametrize("file_preset, asked, depth, remedy", [
    ("tiny", "micro", None, "its tensors fit the tiny preset: configs/import.py:model=tiny$"),
    ("micro", "micro", 3, r"its tensors fit the micro preset as it is: drop the --config.model.\* sizes given$"),
])
def test_an_import_of_the_wrong_size_names_the_preset_its_tensors_fit(file_preset, asked, depth, remedy, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "classifier.pth"
    torch.save({"model_state_dict": mirror.GMAEForClassification(
        GMSTConfig(**{**dataclasses.asdict(GMSTConfig()), **PRESETS[file_preset]}), 3).state_dict()}, path)
    config = load("import", f"model={asked}")
    config.update(path=str(path), class_names="fist,one,palm")
    if depth:
        config.model.depth = depth
    with pytest.raises(config_lib.ConfigError, match=remedy):
        stages.run(config, str(tmp_path / "out"))


def test_a_model_size_the_import_cannot_build_says_where_the_other_sizes_come_from():
    """'num_heads=12 does not divide embed_dim=64': the 12 was the default preset's, never given."""
    config = load("import")
    config.update(path="model.pth")
    config.model.embed_dim = 64
    with pytest.raises(config_lib.ConfigError, match=r"config.model.num_heads=12 does not divide config.model."
                       r"embed_dim=64.*configs/import.py:model=PRESET's sizes, reference by default"):
        stages.validate(config)


def test_repeated_class_names_are_refused(tmp_path):
    config = load("import", "model=micro")
    config.update(path=str(classifier_file(tmp_path)), class_names="fist,fist,palm")
    with pytest.raises(config_lib.ConfigError, match="class names must differ; fist is given more than once"):
        stages.run(config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_repeated_class_names_are_refused_before_the_file_is_read(tmp_path):
    config = load("import", "model=micro")
    config.update(path=str(tmp_path / "not_read.pth"), class_names="fist,palm,fist,peace,palm")
    with pytest.raises(config_lib.ConfigError, match=r"fist, palm is given more than once \(--config.class_names\)"):
        stages.validate(config)


@pytest.mark.parametrize("extra_keys", ["not json", '"encoder_mask_token"', "[1, 2]"])
def test_a_safetensors_whose_extra_keys_are_damaged_is_one_line(extra_keys, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors.numpy.save({"pos_embed": np.zeros((1, 4, 8), np.float32)},
                                            metadata={"config": "{}", "extra_keys": extra_keys}))
    with pytest.raises(config_lib.ConfigError, match=r"model.safetensors: its metadata's 'extra_keys' is not a JSON "
                       r"list of tensor names; a damaged export: export the run again$"):
        weight_files.read_pth(str(path))


def test_an_export_whose_view_is_none_of_ours_is_named_not_dropped(tmp_path):
    path = tmp_path / "classifier.pth"
    state_dict = mirror.GMAEForClassification(micro(), 3).state_dict()
    torch.save({"model_state_dict": state_dict, "config": {"preprocessing": {"view": "weird"}}}, path)
    config = load("import", "model=micro")
    config.update(path=str(path), class_names="fist,one,palm")
    with pytest.raises(config_lib.ConfigError, match=r"classifier.pth: its preprocessing names the view 'weird', none "
                       r"of \('original', .*an export edited, damaged or from a newer gmae_jax; export the run "
                       r"again with this version$"):
        stages.run(config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_repeated_class_names_carried_by_the_file_name_the_file(tmp_path):
    path = tmp_path / "classifier.pth"
    state_dict = mirror.GMAEForClassification(micro(), 3).state_dict()
    torch.save({"model_state_dict": state_dict, "class_names": ["fist", "fist", "palm"]}, path)
    config = load("import", "model=micro")
    config.path = str(path)
    with pytest.raises(config_lib.ConfigError, match=rf"fist is given more than once \(in config.path={path}\)"):
        stages.run(config, str(tmp_path / "out"))


@pytest.mark.parametrize("write, message", [
    (lambda path: path.write_text("these are notes\n"),  # torch.load fails with a bare IndexError or KeyError
     r" does not load with .*: it is no file torch.save wrote, or a damaged one \(\w+Error: "),
    (lambda path: path.write_bytes(b""), r" is empty \(0 bytes\)"),
    (lambda path: [torch.save({"model_state_dict": {"a": torch.zeros(1000)}}, path),
                   path.write_bytes(path.read_bytes()[:2000])],  # a copy cut short
     r" does not load with .*: the file is cut short or damaged \(no zip directory at its end\); copy or download "
     r"it again, or save it again$"),
    (lambda path: torch.save({"model_state_dict": {"pos_embed": [0.0, 1.0]}}, path),
     r": its 'model_state_dict' is not a state_dict \(names to tensors\)"),
])
def test_a_pth_that_holds_no_state_dict_is_named_with_what_it_holds(write, message, tmp_path):
    path = tmp_path / "model.pth"
    write(path)
    config = load("import", "model=micro")
    config.path = str(path)
    with pytest.raises(config_lib.ConfigError, match=rf"^config.path={path}{message}"):
        stages.run(config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_classifier_without_its_head_weights_names_the_missing_key(tmp_path):
    config = load("import", "model=micro")
    config.update(path=str(classifier_file(tmp_path, lambda sd: sd.pop("classifier.1.weight"))),
                  class_names="fist,one,palm")
    with pytest.raises(config_lib.ConfigError, match=r"classifier.pth: missing key 'classifier.1.weight' \(the head"):
        stages.run(config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_safetensors_file_whose_config_metadata_is_no_json_says_so(tmp_path):
    import safetensors.torch
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"pos_embed": torch.zeros(1, 2)}, str(path), metadata={"config": "{not json"})
    config = load("import", "model=micro")
    config.path = str(path)
    with pytest.raises(config_lib.ConfigError, match=r"model.safetensors: its metadata's 'config' is not JSON"):
        stages.run(config, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_bfloat16_checkpoint_imports_widened_to_float32(tmp_path):
    torch.manual_seed(0)
    state_dict = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                  for k, v in mirror.GMAEForClassification(micro(), 3).state_dict().items()}
    path = tmp_path / "bf16.pth"
    torch.save({"model_state_dict": state_dict}, path)
    run_stage("import", tmp_path / "run", path=str(path), class_names="fist,one,palm",
              model=config_lib.model_section("micro"))
    restored = setup.restore_run(str(tmp_path / "run"))
    want = convert.torch_to_flax_variables({k: v.float() for k, v in state_dict.items()}, model="classifier")
    for got, expected in zip(jax.tree.leaves(restored.weights.params), jax.tree.leaves(want["params"])):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(got), expected)


def test_an_originals_classifier_needs_its_class_names_and_a_new_folder(tmp_path):
    config = load("import", "model=micro")
    config.path = str(classifier_file(tmp_path))
    with pytest.raises(config_lib.ConfigError, match="classifier of 3 classes but 0 class names"):
        stages.run(config, str(tmp_path / "out"))
    config.class_names = "fist,one,palm"
    stages.run(config, str(tmp_path / "out"))
    assert run_folder.load_class_names(str(tmp_path / "out")) == ["fist", "one", "palm"]
    with pytest.raises(config_lib.ConfigError, match=r"already holds a run \(or its checkpoints\); import into a new"):
        stages.run(config, str(tmp_path / "out"))
    # A folder left with checkpoints but no config.json (another run's, half deleted) is no place either:
    # orbax would decline the import's step and the folder would mix two runs.
    (tmp_path / "out" / "config.json").unlink()
    before = sorted(str(p) for p in (tmp_path / "out").rglob("*"))
    with pytest.raises(config_lib.ConfigError, match=r"already holds a run \(or its checkpoints\)"):
        stages.run(config, str(tmp_path / "out"))
    assert sorted(str(p) for p in (tmp_path / "out").rglob("*")) == before


@pytest.mark.parametrize("stage", ["pretrain"])  # the classifier has no extras: tests/test_torch_parity.py
def test_reference_export_has_the_originals_keys_and_shapes(stage):
    """On the meta device and through eval_shape: nothing of the 1.3 B parameters is allocated."""
    reference = GMSTConfig(**PRESETS["reference"])
    num_classes = 18 if stage == "finetune" else None
    shapes = convert.expected_state_dict_shapes(reference, model=export.CONVERTER_MODEL[stage],
                                                num_classes=num_classes)
    state, extras = export.split_state_dict(shapes, reference, stage, num_classes)
    with torch.device("meta"):
        original_layout = export_format.original_layout(reference)
        original = (mirror.GMAEForClassification(original_layout, 18) if stage == "finetune"
                    else mirror.GMAE(original_layout))
    assert state == {k: tuple(v.shape) for k, v in original.state_dict().items()}
    assert extras == ({} if stage == "finetune" else {"encoder_mask_token": (1, 1, 768)})
    # Facts of gmst_reference.md: FFN hidden 768 -> 3072, 512 -> 2049; ~1.3 B parameters in GMAE.
    assert state["encoder.blocks.11.mscffn.fc1.weight"] == (4 * 3072, 3072)
    assert state["encoder.blocks.0.attn.in_proj_weight"] == (3 * 768, 768)
    assert state["encoder.patch_embed.proj.weight"] == (768, 3, 16, 16)
    if stage == "pretrain":
        assert state["decoder_blocks.7.mscffn.fc2.weight"] == (512, 4 * 2049)
        assert 1.25e9 < sum(np.prod(s) for s in state.values()) < 1.4e9


def test_overlapping_patches_export_to_the_mirror_layout_with_a_notice(tmp_path, capsys):
    """The run comes in through the import stage: an overlapping model made in PyTorch."""
    torch.manual_seed(0)
    path = tmp_path / "overlap.pth"
    torch.save({"model_state_dict": mirror.GMAEForClassification(micro(overlap_patches=True), 2).state_dict()}, path)
    run_stage("import", tmp_path / "run", path=str(path), class_names="fist,palm",
              model=config_lib.model_section("micro", overlap_patches=True))
    with pytest.raises(config_lib.ConfigError, match=r"config.layout='original' but .* overlap_patches=True") as error:
        run_stage("export", tmp_path / "strict", checkpoint_dir=str(tmp_path / "run"), layout="original")
    assert "\n" not in str(error.value)
    written = run_stage("export", tmp_path / "out", checkpoint_dir=str(tmp_path / "run"))
    notices = [line for line in capsys.readouterr().out.splitlines() if line.startswith("notice:")]
    # The other notice: a file of the original's imports with no evaluation view, so the export says which it describes.
    assert len(notices) == 2 and "mirror layout" in notices[0] and "records no evaluation view" in notices[1]
    assert written["layout"] == "mirror"
    payload = load_pth(tmp_path / "out" / "model.pth")
    gmst = export_format.model_config(payload["config"])
    model = mirror.GMAEForClassification(gmst, 2)
    model.load_state_dict(payload["model_state_dict"], strict=True)
    assert tuple(model.encoder.patch_embed.proj.weight.shape) == (32, 3, 8, 8)  # 2p: not the original's p


def test_export_refuses_to_write_into_the_run_and_says_when_torch_is_missing(tmp_path, monkeypatch):
    config = load("export")
    config.checkpoint_dir = str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match="never writes into a run"):
        stages.run(config, str(tmp_path / "export"))
    real = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name: None if name == "torch" else real(name))
    with pytest.raises(config_lib.ConfigError, match=r"writes model.pth with PyTorch, which is not installed"):
        stages.validate(config)


def test_pytorch_only_preprocessing_reads_16_bit_greyscale_as_its_8_bit_original(tmp_path):
    from PIL import Image

    from gmae_jax.torch_mirror import exported

    eight_bit = (np.arange(64 * 48) % 251).astype(np.uint8).reshape(48, 64)
    Image.fromarray(eight_bit).save(tmp_path / "grey8.png")
    Image.fromarray(eight_bit.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    preprocessing = export.preprocessing(32)
    torch.testing.assert_close(exported.preprocess(str(tmp_path / "grey16.png"), preprocessing),
                               exported.preprocess(str(tmp_path / "grey8.png"), preprocessing))


def test_pytorch_only_preprocessing_decodes_an_opened_jpeg_as_its_path(tmp_path):
    """`Image.open(path)` (not yet loaded) was decoded in full, the path at a reduced scale as gmae_jax
    decodes it: probabilities 0.008 apart on a 200 x 120 photo."""
    from gmae_jax.torch_mirror import exported

    pixels = np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "hand.jpg", quality=90)
    preprocessing = export.preprocessing(32)
    torch.testing.assert_close(exported.preprocess(Image.open(tmp_path / "hand.jpg"), preprocessing),
                               exported.preprocess(str(tmp_path / "hand.jpg"), preprocessing), rtol=0, atol=0)


def test_pytorch_only_classify_of_no_images_is_a_value_error():
    from gmae_jax.torch_mirror import exported

    model = exported.ExportedModel(module=mirror.GMAEForClassification(micro(), 3).eval(),
                                   config={"stage": "finetune", "preprocessing": export.preprocessing(32)})
    with pytest.raises(ValueError, match=r"classify\(\) needs at least one image"):
        model.classify([])


def test_pytorch_only_preprocessing_names_a_file_that_is_no_image(tmp_path):
    """PIL's error named a BytesIO object: in a batch, which file failed was anyone's guess."""
    from gmae_jax.torch_mirror import exported

    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(exported.Image.UnidentifiedImageError,
                       match=f"cannot identify an image in {tmp_path}/notes.jpg$"):
        exported.preprocess(str(tmp_path / "notes.jpg"), export.preprocessing(32))


def test_pytorch_only_hand_crop_of_an_image_that_is_not_square_squares_it_as_gmae_jax_squares_a_box(tmp_path):
    """The image given is the hand's box: squared around it (padded), as training squares a box, not squashed."""
    from gmae_jax.torch_mirror import exported

    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    recipe = export.preprocessing(32, "hand_crop")
    seen_by_gmae_jax = steps.standardize(views.predict_view(str(tmp_path / "wide.png"), "hand_crop", 32,
                                                            box=(0.0, 0.0, 1.0, 1.0)).pixels)
    got = exported.preprocess(str(tmp_path / "wide.png"), recipe).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(got, np.asarray(seen_by_gmae_jax), atol=1e-5)
    np.testing.assert_allclose(got[0], got[0, :1].repeat(32, axis=0), atol=1e-6)  # a padded top row, one colour


def test_pytorch_only_classify_of_one_image_is_a_batch_of_one(tmp_path):
    from gmae_jax.torch_mirror import exported

    model = exported.ExportedModel(module=mirror.GMAEForClassification(micro(), 3).eval(),
                                   config={"stage": "finetune", "preprocessing": export.preprocessing(32)})
    Image.new("RGB", (40, 30), (200, 90, 10)).save(tmp_path / "hand.jpg")
    one = model.classify(str(tmp_path / "hand.jpg"))  # a path, not its characters
    assert one.shape == (1, 3)
    torch.testing.assert_close(one, model.classify([tmp_path / "hand.jpg"]))

    # Run a few at a time, on the module's dtype (here double): the same probabilities, in float32.
    for colour in ((10, 200, 30), (90, 90, 250)):
        Image.new("RGB", (32, 48), colour).save(tmp_path / f"{colour[0]}.png")
    paths = (str(tmp_path / name) for name in ("hand.jpg", "10.png", "90.png"))  # any iterable
    whole = model.classify(paths)
    torch.testing.assert_close(model.classify([tmp_path / "hand.jpg", tmp_path / "10.png", tmp_path / "90.png"],
                                              batch_size=2), whole)
    model.module.double()
    in_double = model.classify([tmp_path / "hand.jpg", tmp_path / "10.png", tmp_path / "90.png"], batch_size=1)
    assert in_double.dtype == torch.float32
    torch.testing.assert_close(in_double, whole, rtol=1e-5, atol=1e-6)


def test_pytorch_only_classify_decodes_ahead_in_threads_to_the_same_probabilities(tmp_path):
    """The next batch is decoded in a thread pool while the model runs: the same numbers, in the same
    order, as decoding in the caller's thread; a file that is no image is still named, and the batches
    after its batch are not decoded."""
    from gmae_jax.torch_mirror import exported

    model = exported.ExportedModel(module=mirror.GMAEForClassification(micro(), 3).eval(),
                                   config={"stage": "finetune", "preprocessing": export.preprocessing(32)})
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
        paths.append(str(tmp_path / f"{i}.jpg"))
    in_caller = model.classify(paths, batch_size=2, decode_threads=0)
    in_threads = model.classify(paths, batch_size=2, decode_threads=3)
    torch.testing.assert_close(in_threads, in_caller, rtol=0, atol=0)
    assert len({tuple(row.tolist()) for row in in_caller}) == 5  # five different images, in their order

    (tmp_path / "notes.jpg").write_text("not an image")
    decoded = []
    original = exported.preprocess
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exported, "preprocess", lambda image, recipe: decoded.append(image) or original(image, recipe))
        with pytest.raises(exported.Image.UnidentifiedImageError,
                           match=f"cannot identify an image in {tmp_path}/notes.jpg$"):
            model.classify([paths[0], str(tmp_path / "notes.jpg"), *paths], batch_size=2, decode_threads=2)
    assert len(decoded) == 2  # the first batch only: the next is submitted once this one is decoded
    with pytest.raises(ValueError, match=r"decode_threads=-1 must be 0 \(no threads\) or more"):
        model.classify(paths, decode_threads=-1)


def test_model_fields_asked_for_on_the_import_of_our_export_are_named_when_not_applied(capsys):
    exported = micro(mask_mode="sparse")
    payload = {"config": {"gmae_jax_model": dataclasses.asdict(exported)}}

    def notices(config):
        assert import_.imported_model(payload, config, {}) == exported  # the export's model, whatever was asked
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("notice:")]

    assert notices(load("import")) == []  # the default asks for nothing
    agreeing = load("import")
    agreeing.model.mask_mode = "sparse"
    assert notices(agreeing) == []
    config = load("import", "model=small")
    config.model.mask_mode = "original"
    [notice] = notices(config)
    assert "preset small" in notice and "mask_mode='original' (the export's: 'sparse')" in notice
