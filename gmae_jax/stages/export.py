"""The export stage: a checkpoint of a pretrain or finetune run as files PyTorch users load without
gmae_jax (configs/export.py; the format is described in gmae_jax/torch_mirror/export_format.py).

The run is read through `setup.restore_run`, which never writes into it; the weights are converted
by `torch_mirror.convert` (renames and transposes only, so the export is exact).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any, TypeVar

import jax
import ml_collections
import numpy as np
import safetensors.numpy
from absl import logging
from etils import epath

from gmae_jax import config_checks, config_lib, run_files, schema
from gmae_jax.data import crops, transforms, views
from gmae_jax.models.presets import GMSTConfig
from gmae_jax.torch_mirror import convert, export_format
from gmae_jax.train import resume_check, run_folder, setup

ONE_PROCESS = True  # it reads the weights and writes files once

LAYOUTS = ("auto", export_format.ORIGINAL, export_format.MIRROR)
CONVERTER_MODEL = {"finetune": "classifier", "pretrain": "pretrain"}
Value = TypeVar("Value")


def validate(config: ml_collections.ConfigDict) -> None:
    setup.validate_run_reference(config)
    config_checks.check(config.layout in LAYOUTS, f"config.layout='{config.layout}' must be one of {LAYOUTS}")
    config_checks.check(importlib.util.find_spec("torch") is not None,
                        "the export stage writes model.pth with PyTorch, which is not installed; "
                        "pip install -e '.[torch]'")


def preprocessing(image_size: int, view: str = "original") -> dict[str, Any]:
    """What a PyTorch user applies to a photo: the run's evaluation view (`view`, from its run.json)."""
    resize = {
        "original": "crop the centred square of side crop_fraction x the shorter side (fractional, not rounded) "
                    "and resize it to image_size x image_size, bilinear: PIL's img.resize((S, S), BILINEAR, "
                    "box=(left, top, left + side, top + side)), as gmae_jax.torch_mirror.exported.preprocess does; "
                    "torchvision's Resize(int(S / crop_fraction)) + CenterCrop(S) crops the same box only where "
                    "S / crop_fraction is a whole number (S = 224 at 0.875; then about 1 level of 255 away on "
                    "non-square images, from its whole-pixel rounding): at other sizes, e.g. 32, use the box",
        "full_frame": "letterbox: resize the longer side to image_size (the other rounded, bilinear) and centre "
                      "the image on an image_size x image_size square of colour fill",
        "hand_crop": "give it the square around the hand (the gesture box's longer side, centred on the box), "
                     "resized to image_size x image_size, bilinear; an image that is not square is taken as the "
                     "box and squared around it (its longer side, centred, the rest filled with fill). gmae_jax's "
                     "predict stage, given a photo without a gesture box, centre-crops it instead (and says so)",
    }[view]
    return {
        "image_size": image_size,
        "view": view,
        "resize": resize,
        "decode": "JPEGs decode at the smallest scale PIL's img.draft('RGB', (D, D)) allows, D = image_size / "
                  "crop_fraction for 'original', image_size otherwise, as in training; then the image is turned "
                  "upright by its EXIF orientation (PIL's ImageOps.exif_transpose)",
        "to_rgb": "RGB stays; transparent pixels (an alpha channel, or a palette's or PNG's transparent colour) "
                  "are composited on black; greyscale of more than 8 bits becomes 8 bits (integer modes: value "
                  ">> 8; float: x 255 where no value exceeds 1, else as is, clipped to 0-255); any other mode "
                  "through PIL's convert('RGB'); gmae_jax.torch_mirror.exported.preprocess does all of this",
        "crop_fraction": views.EVAL_CROP_FRACTION,
        "fill": list(crops.FILL),
        "interpolation": "bilinear",
        "channel_order": "RGB",
        "scale": "pixels / 255, then (x - mean) / std per channel",
        # As written in the recipe (0.485, not float32's 0.48500001430511475): the same float32 once read.
        "mean": [round(float(m), 6) for m in transforms.IMAGENET_MEAN],
        "std": [round(float(s), 6) for s in transforms.IMAGENET_STD],
        "tensor_layout": "NCHW float32",
    }


def choose_layout(requested: str, model: GMSTConfig, run_dir: str) -> str:
    """The layout to write; 'original' for a model the original cannot hold is a config error."""
    fits = export_format.representable_in_original(model)
    if requested == export_format.ORIGINAL and not fits:
        raise config_lib.ConfigError(
            f"config.layout='original' but the run in {run_dir} has overlap_patches=True (a {2 * model.patch_size}"
            f"x{2 * model.patch_size} patch kernel, stride {model.patch_size}), which the original's "
            f"OverlapPatchEmbed ({model.patch_size}x{model.patch_size}, stride {model.patch_size // 2}) "
            "cannot hold; use --config.layout=mirror")
    return export_format.ORIGINAL if requested != export_format.MIRROR and fits else export_format.MIRROR


def split_state_dict(
    state: dict[str, Value], model: GMSTConfig, stage: str, num_classes: int | None,
) -> tuple[dict[str, Value], dict[str, Value]]:
    """(the entries of the original's module tree, the extras gmae_jax adds); values are passed
    through, so shapes split like arrays (the `reference` check needs no array)."""
    original = convert.expected_state_dict_shapes(
        export_format.original_layout(model), model=CONVERTER_MODEL[stage], num_classes=num_classes)
    return ({k: v for k, v in state.items() if k in original},
            {k: v for k, v in state.items() if k not in original})


def torch_state_dict(run: setup.RestoredRun) -> dict[str, np.ndarray]:
    """The run's weights under the original's names; `num_batches_tracked` counts the training-mode
    forward passes (steps x gradient-accumulation steps), as PyTorch's would."""
    host = jax.device_get({"params": run.weights.params, "batch_stats": run.weights.batch_stats})
    state = convert.flax_to_torch_state_dict(host, model=CONVERTER_MODEL[run.config.stage], config=run.model.config)
    forwards = np.asarray(run.step * schema.read_flat(schema.LoopConfig, run.config).grad_accum_steps, np.int64)
    return {k: forwards.copy() if k.endswith(".num_batches_tracked") else v for k, v in state.items()}


EXPORT_FILES = (export_format.CONFIG_JSON, export_format.SAFETENSORS, export_format.MODEL_PTH,
                export_format.ENCODER_PTH)


def _earlier_export(folder: epath.Path) -> dict[str, Any] | None:
    """The config of the export `folder` holds: its config.json, or, where a re-export was cut short
    before config.json came back, the copy in model.safetensors' metadata. None if neither is ours."""
    try:
        if (folder / export_format.CONFIG_JSON).exists():
            config = json.loads((folder / export_format.CONFIG_JSON).read_text())
        else:
            with (folder / export_format.SAFETENSORS).open("rb") as f:
                config = json.loads(export_format.safetensors_metadata(f).get("config", "null"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return config if export_format.is_export_config(config) else None


def _absolute(path: str) -> str:
    """A run's folder as an export records it: absolute, so that it names one folder wherever it is read."""
    return path if "://" in path else os.path.abspath(path)


def check_replaceable(folder: str, run_dir: str) -> str | None:
    """The export replaces only files an export wrote: a folder holding a config.json or model.* of
    something else (a Hugging Face model, a training script's weights) is refused before anything is
    read. Returns a notice when it replaces the export of another run."""
    present = [name for name in EXPORT_FILES if (epath.Path(folder) / name).exists()]
    if not present:
        return None
    earlier = _earlier_export(epath.Path(folder))
    if earlier is None:
        raise config_lib.ConfigError(
            f"--workdir={folder} holds {', '.join(present)}, which no gmae_jax export wrote; the export would "
            "overwrite them: export into another --workdir (or move those files away)")
    if earlier.get("run") and earlier["run"] != _absolute(run_dir):
        return f"notice: replacing the export of {earlier['run']} step {earlier.get('step')} in {folder}"
    return None


def write_export(folder: epath.Path, state: dict[str, np.ndarray], extras: dict[str, np.ndarray],
                 config: dict[str, Any]) -> None:
    """Writes model.pth, model.safetensors, encoder.pth and config.json into `folder`."""
    import torch  # the [torch] extra; checked in validate

    folder.mkdir(parents=True, exist_ok=True)
    # config.json goes first and comes back last: a re-export cut short (a full disk) must not leave a
    # folder that looks complete with files of two checkpoints.
    (folder / export_format.CONFIG_JSON).unlink(missing_ok=True)
    text = json.dumps(config, indent=2)
    # Each file is written whole (a kill leaves the old one or the new one), through epath rather than
    # file names handed to torch / safetensors, so that a gs:// --workdir works like a local one.
    # Which of its tensors the original's modules lack (a strict load_state_dict leaves them out).
    metadata = {"config": text, export_format.EXTRA_KEYS: json.dumps(sorted(extras))}
    safetensors_bytes = safetensors.numpy.save({**state, **extras}, metadata=metadata)
    run_files.write_whole(folder / export_format.SAFETENSORS, lambda f: f.write(safetensors_bytes))

    def tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}

    def save(payload: dict[str, Any], name: str) -> None:
        run_files.write_whole(folder / name, lambda f: torch.save(payload, f))

    save({"model_state_dict": tensors(state), "extra_state_dict": tensors(extras), "config": config,
          "class_names": config["class_names"], "stage": config["stage"], "step": config["step"]},
         export_format.MODEL_PTH)
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    save({"encoder_state_dict": tensors(encoder), "pos_embed": torch.from_numpy(np.array(state["pos_embed"])),
          "config": config}, export_format.ENCODER_PTH)
    run_files.write_text(folder / export_format.CONFIG_JSON, text)  # last: the folder is complete once it is there


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Exports checkpoint `config.checkpoint` of `config.checkpoint_dir` into `workdir`; returns
    the written config."""
    run_folder.check_outside_run(workdir, config.checkpoint_dir, "the export")
    run_files.check_kinds(workdir, (export_format.SAFETENSORS, export_format.MODEL_PTH, export_format.ENCODER_PTH,
                                    export_format.CONFIG_JSON), keeper="the export writes")
    replacing = check_replaceable(workdir, run_folder.run_workdir(config.checkpoint_dir))
    restored = setup.restore_run(config.checkpoint_dir, str(config.checkpoint))
    model, stage = restored.model.config, restored.config.stage
    if replacing:
        print(replacing, flush=True)
    layout = choose_layout(config.layout, model, restored.workdir)
    if layout == export_format.MIRROR:
        notice = ("notice: overlap_patches=True has no equivalent in the original's modules; exported in the "
                  "mirror layout: load it into gmae_jax.torch_mirror.modules' classes"
                  if not export_format.representable_in_original(model) else
                  "notice: exported in the mirror layout (config.layout=mirror)")
        print(notice, flush=True)
    view = resume_check.recorded_view(restored.workdir)
    if view is None:
        why = ("the file it was imported from named none" if restored.config.model.preset == setup.IMPORTED_PRESET
               else "it is older than that record")
        print(f"notice: the run records no evaluation view ({why}); the export describes the centre crop of "
              "class-folder runs", flush=True)
    num_classes = int(restored.config.num_classes) if stage == "finetune" else None
    state, extras = split_state_dict(torch_state_dict(restored), model, stage, num_classes)
    # The run's conv_impl as configured ('auto'), not as resolved for the backend that exports it: an
    # import on a GPU should compute convolutions the GPU's way.
    configured = dataclasses.replace(model, conv_impl=restored.config.model.get("conv_impl", GMSTConfig.conv_impl))
    written = export_format.export_config(
        configured, stage=stage, step=restored.step, layout=layout,
        class_names=restored.class_names if stage == "finetune" else [],  # a pretraining model has no classes
        num_classes=num_classes, mask_ratio=float(restored.config.mask_ratio) if stage == "pretrain" else None,
        norm_pix_loss=schema.read_flat(schema.PretrainConfig, restored.config).norm_pix_loss
        if stage == "pretrain" else None,
        preprocessing=preprocessing(model.img_size, view or "original"), run=_absolute(restored.workdir))
    write_export(epath.Path(workdir), state, extras, written)
    logging.info("[export] %d tensors in model_state_dict, extras %s", len(state), sorted(extras))
    print(f"exported {restored.workdir} step {restored.step} ({stage}, {layout} layout) to {workdir}: "
          f"{export_format.MODEL_PTH}, {export_format.SAFETENSORS}, {export_format.ENCODER_PTH}, "
          f"{export_format.CONFIG_JSON}", flush=True)
    return written
