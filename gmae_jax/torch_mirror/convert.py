"""Flax variables <-> the original PyTorch `state_dict` (names, layouts), in pure numpy.

The Flax modules are named after the PyTorch keys, so conversion is a rename plus a transpose:
conv kernels HWIO <-> OIHW, Dense kernels (in, out) <-> (out, in), MHA's `in_proj` Dense <->
`in_proj_weight`/`in_proj_bias`, BatchNorm `scale/bias` + `mean/var` <-> `weight/bias` +
`running_mean/running_var` (+ `num_batches_tracked`). No torch import here, so exporters can use it
without the `[torch]` extra.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from gmae_jax.models.gmae import GMAE, GMAEClassifier
from gmae_jax.models.presets import GMSTConfig

Model = Literal["pretrain", "classifier"]

# Flax module name -> PyTorch key fragment (ConvBNGELU's `conv`/`bn` are the Sequential's 0 and 1).
_MODULE_TO_TORCH = {"conv": "0", "bn": "1", "head_norm": "classifier.0", "head": "classifier.1"}
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
_BLOCK = re.compile(r"^(blocks|decoder_blocks)_(\d+)$")
_TORCH_BLOCK = re.compile(r"(?:^|\.)(blocks|decoder_blocks)\.(\d+)\.")
# Axis permutations of kernels, by rank: Flax layout -> PyTorch layout and back.
_TO_TORCH_AXES = {2: (1, 0), 4: (3, 2, 0, 1)}
_TO_FLAX_AXES = {2: (1, 0), 4: (2, 3, 1, 0)}


def _torch_key(path: tuple[str, ...]) -> str:
    """Flax path -> PyTorch key, e.g. (..., 'blocks_0', 'msdc', 'conv1x1', 'conv', 'kernel') ->
    '...blocks.0.msdc.conv1x1.0.weight'."""
    *modules, leaf = path
    parts = [_MODULE_TO_TORCH.get(m) or _BLOCK.sub(r"\1.\2", m) for m in modules]
    if modules[-1:] == ["in_proj"]:
        return ".".join(parts[:-1] + ["in_proj_weight" if leaf == "kernel" else "in_proj_bias"])
    return ".".join(parts + [_LEAF_TO_TORCH.get(leaf, leaf)])


def _flax_path(key: str, ndim: int) -> tuple[str, tuple[str, ...]]:
    """Inverse of `_torch_key`: a PyTorch key -> (Flax collection, path)."""
    *parts, leaf = key.split(".")
    if leaf in ("in_proj_weight", "in_proj_bias"):
        parts.append("in_proj")
        leaf = "kernel" if leaf == "in_proj_weight" else "bias"
    modules: list[str] = []
    for part in parts:
        if part.isdigit() and modules and modules[-1] in ("blocks", "decoder_blocks"):
            modules[-1] = f"{modules[-1]}_{part}"
        elif part.isdigit() and modules and modules[-1] == "classifier":
            modules[-1] = ("head_norm", "head")[int(part)]
        elif part.isdigit():
            modules.append(("conv", "bn")[int(part)])
        else:
            modules.append(part)
    if leaf in ("running_mean", "running_var"):
        return "batch_stats", (*modules, leaf.removeprefix("running_"))
    if leaf == "weight":
        leaf = "kernel" if ndim > 1 else "scale"
    return "params", (*modules, leaf)


def _torch_layout(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The permutation taking a Flax leaf to PyTorch layout (None: same layout)."""
    return _TO_TORCH_AXES[len(shape)] if leaf == "kernel" else None


def expected_state_dict_shapes(
    config: GMSTConfig, *, model: Model, num_classes: int | None = None
) -> dict[str, tuple[int, ...]]:
    """PyTorch `state_dict` names and shapes of `model` at `config`, from abstract shapes only.

    Uses `jax.eval_shape` of the Flax init, so even the 1.3 B `reference` costs no memory; kept per
    process, as an export or import asks for the same model's shapes several times (each a trace of
    the whole initialiser: seconds for the large presets).
    """
    return dict(_state_dict_shapes(config, model, num_classes))


@functools.lru_cache(maxsize=16)
def _state_dict_shapes(
    config: GMSTConfig, model: Model, num_classes: int | None
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    abstract = _abstract_variables(config, model, num_classes)
    shapes: dict[str, tuple[int, ...]] = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in flatten_dict(abstract[collection]).items():
            axes = _torch_layout(path[-1], leaf.shape)
            shapes[_torch_key(path)] = tuple(leaf.shape[a] for a in axes) if axes else tuple(leaf.shape)
            if path[-1] == "mean":
                shapes[_torch_key(path[:-1] + ("num_batches_tracked",))] = ()
    return tuple(shapes.items())


def _abstract_variables(config: GMSTConfig, model: Model, num_classes: int | None) -> dict[str, Any]:
    images = jax.ShapeDtypeStruct((1, config.img_size, config.img_size, config.in_channels), jnp.float32)
    if model == "pretrain":
        mask = jax.ShapeDtypeStruct((1, config.num_patches), jnp.bool_)
        init = functools.partial(GMAE(config).init, train=False)
        return jax.eval_shape(init, jax.random.key(0), images, mask)
    if model == "classifier":
        if num_classes is None:
            raise ValueError("model='classifier' needs num_classes")
        init = functools.partial(GMAEClassifier(config, num_classes).init, train=False)
        return jax.eval_shape(init, jax.random.key(0), images)
    raise ValueError(f"model must be 'pretrain' or 'classifier', got {model!r}")


@functools.lru_cache(maxsize=32)
def _names_for_structure(model: Model, depth: int, decoder_depth: int, mask_mode: str) -> frozenset[str]:
    """Key names depend only on the block counts and mask mode; a tiny config gives them cheaply."""
    config = GMSTConfig(img_size=8, patch_size=4, embed_dim=16, depth=depth, num_heads=1,
                        decoder_embed_dim=16, decoder_depth=decoder_depth, decoder_num_heads=1,
                        mlp_ratio=1.0, mask_mode=mask_mode)
    return frozenset(expected_state_dict_shapes(config, model=model, num_classes=2))


def _check(
    shapes: Mapping[str, tuple[int, ...]], *, model: Model, config: GMSTConfig | None
) -> None:
    """Raises ValueError listing missing, unexpected and mis-shaped keys.

    With a config, names and shapes are checked against it; without, only names, with the block
    counts and mask mode taken from the keys themselves.
    """
    if config is not None:
        # The head's width is the one thing a config does not fix; take it from the head itself.
        head = [shapes[k][0] for k in ("classifier.1.bias", "classifier.1.weight") if k in shapes]
        expected = expected_state_dict_shapes(config, model=model, num_classes=(head or [1])[0])
    else:
        depths = {"blocks": 0, "decoder_blocks": 0}
        for key in shapes:
            for name, index in _TORCH_BLOCK.findall(key):
                depths[name] = max(depths[name], int(index) + 1)
        mask_mode = "encoder" if "encoder_mask_token" in shapes else "original"
        names = _names_for_structure(model, depths["blocks"], depths["decoder_blocks"], mask_mode)
        expected = {k: shapes.get(k, ()) for k in names}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(f"{k}: {tuple(shapes[k])} != {expected[k]}"
                   for k in set(expected) & set(shapes) if tuple(shapes[k]) != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"state_dict does not match the original's {model!r} layout:\n"
            f"  missing keys ({len(missing)}): {missing}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected}\n"
            f"  wrong shapes ({len(wrong)}): {wrong}"
        )


def flax_to_torch_state_dict(
    variables: Mapping[str, Any], *, model: Model, config: GMSTConfig | None = None
) -> dict[str, np.ndarray]:
    """Flax `{'params', 'batch_stats'}` of GMAE ('pretrain') / GMAEClassifier ('classifier') ->
    numpy arrays under the original's `state_dict` names, loadable with `strict=True`.

    Pass `config` to also check every shape against it.
    """
    state: dict[str, np.ndarray] = {}
    for collection in ("params", "batch_stats"):
        for path, value in flatten_dict(variables.get(collection, {})).items():
            array = np.asarray(value)
            axes = _torch_layout(path[-1], array.shape)
            state[_torch_key(path)] = np.ascontiguousarray(array.transpose(axes) if axes else array)
            if collection == "batch_stats" and path[-1] == "mean":
                state[_torch_key(path[:-1] + ("num_batches_tracked",))] = np.zeros((), np.int64)
    _check({k: v.shape for k, v in state.items()}, model=model, config=config)
    return state


def torch_to_flax_variables(
    state_dict: Mapping[str, Any], *, model: Model, config: GMSTConfig | None = None
) -> dict[str, dict[str, Any]]:
    """Inverse of `flax_to_torch_state_dict`: the original's `state_dict` (numpy arrays or CPU
    tensors) -> Flax `{'params', 'batch_stats'}` of numpy arrays. Exact: only renames and transposes.
    """
    arrays = {key: np.asarray(value) for key, value in state_dict.items()}
    _check({k: v.shape for k, v in arrays.items()}, model=model, config=config)
    flat: dict[str, dict[tuple[str, ...], np.ndarray]] = {"params": {}, "batch_stats": {}}
    for key, array in arrays.items():
        if key.endswith(".num_batches_tracked"):
            continue
        collection, path = _flax_path(key, array.ndim)
        axes = _TO_FLAX_AXES[array.ndim] if path[-1] == "kernel" else None
        flat[collection][path] = np.ascontiguousarray(array.transpose(axes) if axes else array)
    return {collection: unflatten_dict(leaves) for collection, leaves in flat.items()}
