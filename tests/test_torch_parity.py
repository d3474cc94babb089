"""The Flax model exports to the original PyTorch layout and computes what the original computes."""

import functools
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

from gmae_jax.models import modules
from gmae_jax.models.gmae import GMAE, GMAEClassifier
from gmae_jax.models.masking import sample_mask
from gmae_jax.models.presets import PRESETS, GMSTConfig
from gmae_jax.torch_mirror import modules as mirror
from gmae_jax.torch_mirror.convert import (
    expected_state_dict_shapes,
    flax_to_torch_state_dict,
    torch_to_flax_variables,
)

SIZES = {
    "micro": PRESETS["micro"],
    "small48": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                    decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0),
}
NUM_CLASSES = 5
TOLERANCE = 1e-4


def config(size: str, **overrides) -> GMSTConfig:
    return GMSTConfig(**{**SIZES[size], **overrides})


def images(c: GMSTConfig, batch: int = 2) -> np.ndarray:
    shape = (batch, c.img_size, c.img_size, c.in_channels)
    return np.random.default_rng(0).normal(size=shape).astype(np.float32)


def random_variables(model: nn.Module, *inputs: np.ndarray, seed: int = 1) -> dict:
    """Variables with Flax's structure and random values (eager Flax init costs seconds per model).

    Biases, norms, gammas and BatchNorm statistics are moved off 0/1 so that a swapped or dropped
    entry changes the output.
    """
    abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), *inputs)
    rng = np.random.default_rng(seed)

    def fill(path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        if path[-1] == "kernel":
            value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
        elif path[-1] == "var":
            value = rng.uniform(0.5, 1.5, shape)
        elif path[-1] == "scale" or path[-1].startswith("gamma"):
            value = rng.normal(1.0, 0.1, shape)
        else:  # biases, BatchNorm means, position embeddings, mask tokens
            value = rng.normal(0.0, 0.1, shape)
        return value.astype(np.float32)

    return unflatten_dict({path: fill(path, leaf.shape) for path, leaf in flatten_dict(abstract).items()})


def relative_error(actual: torch.Tensor, expected: jax.Array) -> float:
    expected = np.asarray(expected)
    return float(np.abs(actual.detach().numpy() - expected).max() / np.abs(expected).max())


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def load(module: torch.nn.Module, state: dict[str, np.ndarray]) -> torch.nn.Module:
    module.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
    return module.eval()


def logits_and_features(module: GMAEClassifier, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return module(x, train=False), module.features(x, train=False)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("size", sorted(SIZES))
def test_classifier_logits_and_features_match_the_torch_mirror(size: str, overlap: bool) -> None:
    c = config(size, overlap_patches=overlap)
    x = images(c)
    model = GMAEClassifier(c, NUM_CLASSES)
    variables = random_variables(model, x)
    logits, features = jax.jit(functools.partial(model.apply, method=logits_and_features))(variables, x)

    state = flax_to_torch_state_dict(variables, model="classifier", config=c)
    torch_model = load(mirror.GMAEForClassification(c, NUM_CLASSES), state)
    with torch.no_grad():
        torch_logits = torch_model(to_nchw(x))
        torch_features = torch_model.features(to_nchw(x))

    assert torch_logits.shape == (2, NUM_CLASSES)
    assert relative_error(torch_logits, logits) < TOLERANCE
    assert relative_error(torch_features, features) < TOLERANCE


# Each size meets both overlap settings and every mask mode (the full product doubles the run time).
@pytest.mark.parametrize("size, overlap, mask_mode", [
    ("micro", False, "encoder"), ("micro", True, "original"), ("micro", True, "sparse"),
    ("small48", True, "encoder"), ("small48", False, "original"), ("small48", False, "sparse"),
])
def test_pretraining_reconstruction_matches_the_torch_mirror(
    size: str, overlap: bool, mask_mode: str
) -> None:
    c = config(size, overlap_patches=overlap, mask_mode=mask_mode)
    x = images(c)
    mask = np.array(sample_mask(jax.random.key(2), 2, c.num_patches, 0.5))
    model = GMAE(c)
    variables = random_variables(model, x, mask)
    num_visible = c.num_patches // 2 if mask_mode == "sparse" else None
    pred = jax.jit(functools.partial(model.apply, train=False, num_visible=num_visible))(variables, x, mask)

    torch_model = load(mirror.GMAE(c), flax_to_torch_state_dict(variables, model="pretrain", config=c))
    with torch.no_grad():
        torch_pred = torch_model(to_nchw(x), torch.from_numpy(mask))

    assert torch_pred.shape == (2, c.num_patches, c.patch_size**2 * c.in_channels)
    assert relative_error(torch_pred, pred) < TOLERANCE


def test_original_mask_mode_is_the_originals_forward() -> None:
    """The spec's order: the encoder on the whole image, `pos_embed` added to its output, then the
    decoder's tokens with mask tokens at masked cells (the parity test above carries this to Flax)."""
    c = config("micro", mask_mode="original")
    torch.manual_seed(0)
    model = mirror.GMAE(c).eval()
    x, mask = to_nchw(images(c)), torch.from_numpy(np.array(sample_mask(jax.random.key(2), 2, c.num_patches, 0.5)))
    with torch.no_grad():
        latent = model.encoder(x) + model.pos_embed
        tokens = torch.where(mask[..., None], model.mask_token, model.decoder_embed(latent)) + model.decoder_pos_embed
        for block in model.decoder_blocks:
            tokens = block(tokens, 8, 8)
        expected = model.decoder_pred(model.decoder_norm(tokens))
        np.testing.assert_array_equal(model(x, mask).numpy(), expected.numpy())


def test_sparse_mode_in_training_matches_the_torch_mirror() -> None:
    """Training mode: BatchNorm normalises over the visible cells only, in the sparse encoder's
    BatchNorm and the mirror's, and both running averages move alike (PyTorch's n / (n - 1) aside)."""
    c = config("micro", mask_mode="sparse", attention_dropout=0.0)
    x = images(c, batch=4)
    mask = np.array(sample_mask(jax.random.key(2), 4, c.num_patches, 0.5))
    model = GMAE(c)
    variables = random_variables(model, x, mask)
    num_visible = c.num_patches // 2
    apply = functools.partial(model.apply, train=True, num_visible=num_visible, mutable=["batch_stats"])
    pred, updates = jax.jit(apply)(variables, x, mask)

    torch_model = load(mirror.GMAE(c), flax_to_torch_state_dict(variables, model="pretrain", config=c)).train()
    with torch.no_grad():
        torch_pred = torch_model(to_nchw(x), torch.from_numpy(mask))
    assert relative_error(torch_pred, pred) < TOLERANCE
    # An encoder branch's statistics (over 4 x 32 visible cells) and a decoder one's (over all 4 x 64).
    for flax_path, torch_name, n in ((("encoder", "blocks_0", "mscffn", "dconv2", "bn"), "encoder.blocks.0.mscffn.dconv2.1",
                                      4 * num_visible),
                                     (("decoder_blocks_0", "msdc", "fusion", "bn"), "decoder_blocks.0.msdc.fusion.1",
                                      4 * c.num_patches)):
        stats, before = updates["batch_stats"], variables["batch_stats"]
        for key in flax_path:
            stats, before = stats[key], before[key]
        norm = torch_model.get_submodule(torch_name)
        np.testing.assert_allclose(norm.running_mean.numpy(), stats["mean"], rtol=1e-4, atol=1e-5)
        # Both moved 0.1 of the way from the same start: compare the steps, PyTorch's unbiased.
        np.testing.assert_allclose(norm.running_var.numpy() - 0.9 * before["var"],
                                   (np.asarray(stats["var"]) - 0.9 * before["var"]) * n / (n - 1), rtol=1e-4)


REFERENCE = GMSTConfig(**PRESETS["reference"], img_size=224, patch_size=16, overlap_patches=False,
                       mask_mode="original")


@pytest.mark.parametrize("model", ["pretrain", "classifier"])
def test_original_sizes_have_the_original_state_dict(model: str) -> None:
    with torch.device("meta"):
        if model == "pretrain":
            module = mirror.GMAE(REFERENCE)
        else:
            module = mirror.GMAEForClassification(REFERENCE, 18)
    mirror_shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    shapes = expected_state_dict_shapes(REFERENCE, model=model, num_classes=18)

    assert shapes == mirror_shapes
    assert shapes["encoder.blocks.0.attn.in_proj_weight"] == (2304, 768)
    assert shapes["encoder.blocks.11.mscffn.fc1.weight"] == (12288, 3072)
    assert shapes["encoder.blocks.0.msdc.conv1x1.1.num_batches_tracked"] == ()
    assert shapes["encoder.blocks.0.norm2.weight"] == (768,)
    assert "encoder_mask_token" not in shapes
    if model == "pretrain":
        assert shapes["decoder_blocks.7.mscffn.fusion.0.weight"] == (2049, 2049, 1, 1)
        assert shapes["decoder_pred.weight"] == (768, 512)
        assert sum(p.numel() for p in module.parameters()) == pytest.approx(1.3e9, rel=0.03)
    else:
        assert shapes["classifier.1.weight"] == (18, 768)


def test_encoder_mask_token_exists_only_in_encoder_mask_mode() -> None:
    for mask_mode, present in (("encoder", True), ("original", False)):
        c = config("micro", mask_mode=mask_mode)
        with torch.device("meta"):
            assert ("encoder_mask_token" in mirror.GMAE(c).state_dict()) is present
        assert ("encoder_mask_token" in expected_state_dict_shapes(c, model="pretrain")) is present


@pytest.mark.parametrize("model", ["pretrain", "classifier"])
def test_flax_torch_flax_round_trip_is_exact(model: str) -> None:
    c = config("small48", overlap_patches=True)
    x = images(c, batch=1)
    if model == "pretrain":
        variables = random_variables(GMAE(c), x, np.zeros((1, c.num_patches), bool))
    else:
        variables = random_variables(GMAEClassifier(c, NUM_CLASSES), x)
    variables = jax.tree.map(jnp.asarray, variables)

    state = flax_to_torch_state_dict(variables, model=model)
    back = flatten_dict(torch_to_flax_variables(state, model=model))
    original = flatten_dict(variables)

    assert back.keys() == original.keys()
    for path, value in original.items():
        assert back[path].dtype == value.dtype and np.array_equal(back[path], value), path


def test_torch_state_dict_loads_back_into_flax() -> None:
    c = config("micro")
    torch.manual_seed(0)
    state = mirror.GMAEForClassification(c, NUM_CLASSES).state_dict()
    variables = torch_to_flax_variables(state, model="classifier", config=c)
    x = images(c, batch=1)
    expected = jax.eval_shape(
        functools.partial(GMAEClassifier(c, NUM_CLASSES).init, train=False), jax.random.key(0), x
    )

    assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda s: s.shape, expected)


def test_missing_key_is_reported_by_name() -> None:
    c = config("micro")
    state = mirror.GMAEForClassification(c, NUM_CLASSES).state_dict()
    del state["encoder.blocks.1.attn.in_proj_bias"]

    with pytest.raises(ValueError, match=r"missing keys \(1\): \['encoder.blocks.1.attn.in_proj_bias'\]"):
        torch_to_flax_variables(state, model="classifier")


def test_unexpected_key_and_wrong_shape_are_reported() -> None:
    c = config("micro")
    state = {k: v.numpy() for k, v in mirror.GMAEForClassification(c, NUM_CLASSES).state_dict().items()}
    state["encoder.blocks.0.extra"] = np.zeros(3, np.float32)
    state["pos_embed"] = np.zeros((1, 16, c.embed_dim), np.float32)

    with pytest.raises(ValueError, match=r"unexpected keys \(1\): \['encoder.blocks.0.extra'\]") as error:
        torch_to_flax_variables(state, model="classifier", config=c)
    assert "pos_embed: (1, 16, 32) != (1, 64, 32)" in str(error.value)


def test_pretraining_variables_are_not_a_classifier_state_dict() -> None:
    c = config("micro")
    x = images(c, batch=1)
    variables = random_variables(GMAE(c), x, np.zeros((1, c.num_patches), bool))

    with pytest.raises(ValueError, match=r"missing keys \(4\): \[.classifier.0.bias."):
        flax_to_torch_state_dict(variables, model="classifier")


def test_converter_and_package_import_without_torch() -> None:
    code = ("import sys, gmae_jax, gmae_jax.models.gmae, gmae_jax.torch_mirror.convert; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_training_mode_batch_norm_matches_pytorchs():
    """Batch statistics, PyTorch's momentum 0.1 (Flax 0.9) and the running averages of one training
    step; `running_var` differs only by PyTorch's unbiased n / (n - 1) (README, "BatchNorm running_var")."""
    x = np.random.default_rng(0).normal(3.0, 2.0, (4, 8, 8, 6)).astype(np.float32)
    layer = modules.ConvBNGELU(5, kernel_size=3, dilation=2)
    variables = jax.jit(functools.partial(layer.init, train=False))(jax.random.key(0), x)
    out, updates = layer.apply(variables, x, train=True, mutable=["batch_stats"])
    torch_layer = mirror._conv_bn_gelu(6, 5, 3, 2).train()
    with torch.no_grad():
        conv = variables["params"]["conv"]
        torch_layer[0].weight.copy_(torch.tensor(np.asarray(conv["kernel"]).transpose(3, 2, 0, 1)))  # HWIO->OIHW
        torch_layer[0].bias.copy_(torch.tensor(np.asarray(conv["bias"])))
        torch_out = torch_layer(to_nchw(x))
    assert relative_error(torch_out.permute(0, 2, 3, 1), out) < TOLERANCE
    stats, n = updates["batch_stats"]["bn"], 4 * 8 * 8
    np.testing.assert_allclose(torch_layer[1].running_mean.numpy(), stats["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(torch_layer[1].running_var.numpy() - 0.9,
                               (np.asarray(stats["var"]) - 0.9) * n / (n - 1), rtol=1e-4)
