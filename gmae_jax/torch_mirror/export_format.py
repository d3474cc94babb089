"""What an exported folder holds and how its `config.json` reads: shared by the export and import
stages (JAX side) and the PyTorch-only loader, so it imports neither JAX nor torch.

A folder written by `configs/export.py`:
- `model.pth`: `{'model_state_dict', 'extra_state_dict', 'config', 'class_names', 'stage', 'step'}`,
  tensors and plain Python values only (`torch.load(path, weights_only=True)` opens it).
  `model_state_dict` has exactly the keys of the original's `GMAEForClassification` / `GMAE`;
  `extra_state_dict` holds what gmae_jax adds (the pretraining model's `encoder_mask_token`), so the
  original's strict `load_state_dict` never sees a key it lacks.
- `model.safetensors`: every tensor of both dicts, with `config.json`'s content as metadata ('config')
  and the keys of `extra_state_dict` as a JSON list ('extra_keys'): drop those for the original's strict
  `load_state_dict`.
- `encoder.pth`: `{'encoder_state_dict', 'pos_embed', 'config'}`, the encoder alone.
- `config.json`: the run folder and step exported, the architecture under the original's config
  names, the classes in output order, the preprocessing a PyTorch user applies, and the full gmae_jax
  model config.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, BinaryIO

from gmae_jax.models.presets import GMSTConfig

MODEL_PTH = "model.pth"
SAFETENSORS = "model.safetensors"
ENCODER_PTH = "encoder.pth"
CONFIG_JSON = "config.json"
EXTRA_KEYS = "extra_keys"  # model.safetensors' metadata: the tensors of extra_state_dict

# 'original': the original's own modules hold the weights. 'mirror': only the mirror's classes in
# gmae_jax/torch_mirror/modules.py do (same key names; today: an overlapping patch kernel of 2p).
ORIGINAL, MIRROR = "original", "mirror"
MODEL_CLASSES = {"finetune": "GMAEForClassification", "pretrain": "GMAE"}
# The architecture fields of the original's config (its GMAEConfig / YAML keys).
ORIGINAL_FIELDS = ("in_channels", "img_size", "patch_size", "embed_dim", "depth", "num_heads",
                   "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mlp_ratio", "overlap_patches")
# Present in the original's config but unused by its modules (they hard-code 3x3, dilations 1-3);
# written so that its `BaseConfig(**fields)` takes the section as it is.
ORIGINAL_UNUSED = {"dilation_rates": [1, 3, 5], "ffn_kernel_sizes": [3, 5, 7]}


def safetensors_metadata(f: BinaryIO) -> dict[str, str]:
    """The metadata of the .safetensors file open in `f`, read from its header alone (the format: an
    8-byte little-endian header length, then the JSON header): an export keeps its config there."""
    return json.loads(f.read(int.from_bytes(f.read(8), "little"))).get("__metadata__") or {}


def is_export_config(config: Any) -> bool:
    """Whether `config` (a parsed config.json, or model.safetensors' metadata) is one an export wrote."""
    return isinstance(config, dict) and isinstance(config.get("gmae_jax_model"), dict)


def original_layout(config: GMSTConfig) -> GMSTConfig:
    """The same model as the original's module tree holds it: no `encoder_mask_token`."""
    return dataclasses.replace(config, mask_mode="original")


def representable_in_original(config: GMSTConfig) -> bool:
    """Whether the original's modules can hold this model's weights. Its OverlapPatchEmbed has a
    p x p kernel with stride p/2; gmae_jax's overlapping embedding has 2p x 2p with stride p."""
    return not config.overlap_patches


def export_config(
    model: GMSTConfig, *, stage: str, step: int, layout: str, class_names: Sequence[str],
    num_classes: int | None, mask_ratio: float | None, preprocessing: dict[str, Any],
    norm_pix_loss: bool | None = None, run: str = "",
) -> dict[str, Any]:
    """The content of `config.json` (and of `model.pth['config']`): JSON types only. A pretraining
    model also carries its loss's settings (`pretraining`), so that an import evaluates it as trained."""
    original = {name: getattr(model, name) for name in ORIGINAL_FIELDS}
    original.update(ORIGINAL_UNUSED, num_classes=num_classes)
    if mask_ratio is not None:
        original["mask_ratio"] = mask_ratio
    return {
        "model": original,
        "num_classes": num_classes,
        "class_names": list(class_names),
        "preprocessing": preprocessing,
        "stage": stage,
        "model_class": MODEL_CLASSES[stage],
        "layout": layout,
        "step": step,
        "run": run,  # the run folder exported, beside its step
        "pretraining": None if mask_ratio is None else {"mask_ratio": mask_ratio, "norm_pix_loss": bool(norm_pix_loss)},
        # What gmae_jax (and its PyTorch mirror) rebuilds the model from.
        "gmae_jax_model": dataclasses.asdict(model),
    }


def model_config(config: dict[str, Any]) -> GMSTConfig:
    """The `GMSTConfig` an export was written from (its `config.json` or `model.pth['config']`).
    ValueError, naming the field, where it is not a model this version builds (an export of a later
    version with a new field, or an edited one)."""
    fields = config.get("gmae_jax_model") if isinstance(config, dict) else None
    if not isinstance(fields, dict):
        raise ValueError("its config has no gmae_jax_model section")
    unknown = sorted(set(fields) - {field.name for field in dataclasses.fields(GMSTConfig)})
    if unknown:
        raise ValueError(f"its model has field(s) this version does not know: {', '.join(unknown)}")
    model = GMSTConfig(**fields)
    for field in dataclasses.fields(model):  # JSON writes a float such as 4.0 as 4
        want, value = type(getattr(GMSTConfig(), field.name)), getattr(model, field.name)
        if isinstance(value, bool) != (want is bool) or not isinstance(value, (int, float) if want is float else want):
            raise ValueError(f"its model's {field.name}={value!r} is no {want.__name__}")
    return model
