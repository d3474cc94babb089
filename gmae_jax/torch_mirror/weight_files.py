"""A PyTorch weights file as numpy: the original's checkpoints and training scripts' checkpoint dicts
(`.pth`, read with `torch.load(weights_only=True)`, which never runs pickled code), bare state dicts,
and our export's `model.safetensors`, with the prefixes of torch's wrappers taken off the keys. What
the import stage reads; needs the `[torch]` extra."""

from __future__ import annotations

import argparse
import io
import os
import json
import pickle
import re
from typing import Any

import numpy as np
from etils import epath

from gmae_jax.data import class_folders
from gmae_jax.schema import ConfigError
from gmae_jax.torch_mirror import export_format

# Prefixes wrappers give every key: torch's DataParallel and DistributedDataParallel ("module."),
# torch.compile ("_orig_mod."), in either order.
_WRAPPED = ("module.", "_orig_mod.")
# Where training scripts keep the model's state_dict in their checkpoint dict: the original's key first.
_STATE_DICT_KEYS = ("model_state_dict", "model", "state_dict")


def read_pth(path: str) -> dict[str, Any]:
    """The file's top-level dict, tensors as numpy (floating point as float32); never runs pickled code."""
    import torch  # the [torch] extra; checked in validate

    if not epath.Path(path).exists() and not os.path.islink(path):
        raise ConfigError(f"config.path={path} does not exist; give the .pth (or .safetensors) to import")
    if not class_folders.is_regular_file(epath.Path(path)):  # a pipe would read as empty, or wait forever
        raise ConfigError(f"config.path={path} is not a file (a folder, a pipe, a link to nothing?); "
                          "give a .pth")
    if epath.Path(path).stat().length == 0:
        raise ConfigError(f"config.path={path} is empty (0 bytes); give a .pth that was saved in full")
    if path.endswith(".safetensors"):
        payload = _read_safetensors(path)
    else:
        payload = _torch_load(path)

    def is_state_dict(value: Any) -> bool:
        return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())

    if is_state_dict(payload):
        payload = {"model_state_dict": payload}  # a bare state_dict
    elif isinstance(payload, dict) and "model_state_dict" not in payload:
        key = next((k for k in _STATE_DICT_KEYS if is_state_dict(payload.get(k))), None)
        if key is not None:  # a training script's checkpoint: {'model': state_dict, 'optimizer': ..., ...}
            payload = {"model_state_dict": payload[key]}
    if not (isinstance(payload, dict) and "model_state_dict" in payload):
        found = f"a dict of {', '.join(map(repr, list(payload)[:8]))}" if isinstance(payload, dict) else (
            f"a {type(payload).__name__}")
        raise ConfigError(
            f"config.path={path} holds {found}, and no state_dict under {', '.join(map(repr, _STATE_DICT_KEYS))}: "
            "save the model's state_dict (torch.save(model.state_dict(), path)); an export's encoder.pth is the "
            "encoder alone, import its model.pth")
    for key in ("model_state_dict", "extra_state_dict"):
        tensors = payload.get(key, {})
        if not (isinstance(tensors, dict) and all(isinstance(v, torch.Tensor) for v in tensors.values())):
            raise ConfigError(f"config.path={path}: its '{key}' is not a state_dict (names to tensors)")
        payload[key] = {k: _as_numpy(v, k, path) for k, v in tensors.items()}
        payload[key] = _unwrapped(payload[key])
    return payload


def _torch_load(path: str) -> Any:
    """`torch.load(weights_only=True)` of a local file memory-mapped: a training checkpoint's optimiser
    state (twice the weights, for AdamW) is never read, and the weights are read once (through a
    BytesIO of the whole file, an import of the original's 15.6 GB `reference` checkpoint held ~31 GB
    before converting anything). Files torch.load cannot map (its legacy format) and bucket paths
    (torch opens local files only) are read whole."""
    import torch  # the [torch] extra; checked in validate

    # Training scripts often save their argparse arguments beside the weights: a plain record of
    # values, allowed; any other pickled object is still refused.
    with torch.serialization.safe_globals([argparse.Namespace]):
        if "://" not in path:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # noqa: BLE001 (not mappable or no checkpoint: the whole-file read says which)
                pass
        try:
            return torch.load(io.BytesIO(epath.Path(path).read_bytes()), map_location="cpu", weights_only=True)
        except Exception as error:  # bytes that are no checkpoint fail with any error type
            raise ConfigError(f"config.path={path} does not load with torch.load(weights_only=True), "
                              f"which never runs pickled code: {_reason(error)}") from None


def _as_numpy(tensor: Any, name: str, path: str) -> np.ndarray:
    """A saved tensor as numpy: numpy has no bfloat16, and the model computes in float32, so
    half-precision saves widen exactly; one saved with its autograd state (keep_vars=True) is detached."""
    tensor = tensor.detach()
    try:
        return (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    except (RuntimeError, TypeError, NotImplementedError) as error:  # meta, sparse, quantised tensors
        raise ConfigError(f"config.path={path}: tensor '{name}' holds no dense values to read "
                          f"({type(error).__name__}: {str(error).splitlines()[0]}); save the model's "
                          "state_dict from a model on the CPU") from None


def _unwrapped(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keys without the prefixes wrappers gave all of them (`module._orig_mod.x` -> `x`)."""
    while state:
        prefix = next((p for p in _WRAPPED if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _read_safetensors(path: str) -> dict[str, Any]:
    """Our export's model.safetensors as the payload of its model.pth: the tensors, and the config
    its metadata carries (a safetensors file without it is read as a bare state_dict)."""
    import safetensors.torch

    data = epath.Path(path).read_bytes()
    try:
        tensors = safetensors.torch.load(data)  # not .numpy: numpy has no bfloat16
        metadata = export_format.safetensors_metadata(io.BytesIO(data))
    except Exception as error:  # any damage to the header or the data
        raise ConfigError(f"config.path={path} is not a readable .safetensors file: {error}") from None
    if "config" not in metadata:
        return {"model_state_dict": tensors}
    try:
        config = json.loads(metadata["config"])
    except ValueError as error:
        raise ConfigError(f"config.path={path}: its metadata's 'config' is not JSON ({error}); a "
                          "damaged export: export the run again") from None
    try:
        extra_keys = json.loads(metadata.get(export_format.EXTRA_KEYS, "[]"))
    except ValueError:
        extra_keys = None
    if not (isinstance(extra_keys, list) and all(isinstance(key, str) for key in extra_keys)):
        raise ConfigError(f"config.path={path}: its metadata's '{export_format.EXTRA_KEYS}' is not a JSON list of "
                          "tensor names; a damaged export: export the run again")
    extra_keys = set(extra_keys)
    return {"model_state_dict": {k: v for k, v in tensors.items() if k not in extra_keys},
            "extra_state_dict": {k: v for k, v in tensors.items() if k in extra_keys}, "config": config,
            "class_names": config.get("class_names"), "step": config.get("step")}


def _reason(error: Exception) -> str:
    """The line of torch's refusal that says what was refused (it opens and closes with boilerplate).
    Errors of other types (KeyError: 101 for a text file) come from unpickling bytes that are no
    checkpoint, which their bare message does not say."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if pickled:  # torch's own advice (weights_only=False) is what this stage never does
        return (f"it holds a pickled {pickled.group(1)}, not only tensors; save the model's state_dict instead "
                "(torch.save(model.state_dict(), path))")
    if "failed finding central directory" in str(error) or "failed reading zip archive" in str(error):
        return ("the file is cut short or damaged (no zip directory at its end); copy or download it again, or "
                "save it again")
    first = next((line for line in lines if not line.startswith(boilerplate)), lines[0]) if lines else ""
    # An opcode the unpickler does not know: bytes of something else (a text file named .pth).
    if isinstance(error, (pickle.UnpicklingError, RuntimeError)) and first and "Unsupported operand" not in first:
        return first
    detail = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return f"it is no file torch.save wrote, or a damaged one ({detail})"
