"""Model sizes. `reference` is exactly the original G-MAE; the others keep its architecture.

Plain Python only (no jax): the PyTorch-only inference path builds its modules from these too."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

MASK_MODES = ("encoder", "original", "sparse")
# Rematerialisation of each GMST block in the backward pass: none; the whole block (keep only its
# input); or fine (keep matmul and conv outputs, recompute norms and activations).
REMAT_MODES = ("none", "block", "fine")


@dataclasses.dataclass(frozen=True)
class GMSTConfig:
    """Architecture hyper-parameters (names as in the original's config)."""

    img_size: int = 224
    in_channels: int = 3
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    overlap_patches: bool = False
    attention_dropout: float = 0.1
    # 'encoder': the encoder never sees masked content (default). 'original': the original's leak.
    # 'sparse': as 'encoder', but the encoder computes on the visible tokens only (cheaper).
    mask_mode: str = "encoder"
    dtype: str = "float32"  # compute dtype; parameters and optimiser state stay float32
    remat: str = "none"  # one of REMAT_MODES
    # How convolutions are computed (same parameters and numbers): one of fast_conv.CONV_IMPLS.
    conv_impl: str = "auto"

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


PRESETS: dict[str, dict[str, Any]] = {
    # The original's defaults: ~1.3 B parameters with the decoder.
    "reference": dict(embed_dim=768, depth=12, num_heads=12,
                      decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0),
    "base": dict(embed_dim=384, depth=12, num_heads=6,
                 decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8, mlp_ratio=4.0),
    "small": dict(embed_dim=256, depth=8, num_heads=8,
                  decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, mlp_ratio=2.0),
    "tiny": dict(embed_dim=128, depth=4, num_heads=4,
                 decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, mlp_ratio=2.0),
    # The CPU demo at 32x32 with 4x4 patches: the narrowest width that still learns the drawn
    # gestures in a few minutes (micro's 32 channels plateau near chance).
    "mini": dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                 decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4, mlp_ratio=2.0),
    # For tests at 32x32 with 4x4 patches.
    "micro": dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mlp_ratio=1.0),
}


def gmst_config(fields: Mapping[str, Any]) -> GMSTConfig:
    """Builds a `GMSTConfig` from a config mapping (e.g. `config.model`); unknown keys are an error."""
    known = {f.name for f in dataclasses.fields(GMSTConfig)}
    fields = {k: v for k, v in dict(fields).items() if k != "preset"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"config.model has unknown field(s) {unknown}; known: {sorted(known)}")
    return GMSTConfig(**fields)


def ffn_hidden_dim(dim: int, mlp_ratio: float) -> int:
    """`int(dim * mlp_ratio)` rounded up to a multiple of 3 (three dilated branches)."""
    hidden = int(dim * mlp_ratio)
    return hidden + (-hidden) % 3


def patch_embed_geometry(patch_size: int, overlap: bool) -> tuple[int, int, int]:
    """(kernel, stride, padding) of the patch projection.

    Overlapping windows use kernel 2p, stride p and padding p/2: each token sees p/2 pixels into its
    neighbours while the token grid stays the p x p patch grid the reconstruction target uses. (The
    original's stride-p/2 grid cannot pretrain; see README.)
    """
    if overlap:
        return 2 * patch_size, patch_size, patch_size // 2
    return patch_size, patch_size, 0
