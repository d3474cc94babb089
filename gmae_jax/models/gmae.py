"""The GMST encoder, the G-MAE pretraining model and the fine-tuning classifier.

Differences from the original (by design, see README "How this differs from the original"):
- masking happens *before* the encoder: masked pixels are zeroed (so overlapping windows of visible
  tokens cannot see them) and masked tokens are replaced by a learned `encoder_mask_token`;
  `mask_mode='original'` keeps the original's leaky behaviour for comparison, its `pos_embed`
  added after the encoder as there;
- `mask_mode='sparse'` masks the same way but runs the encoder on the visible tokens only (as
  SparK/ConvMAE do for conv + attention encoders; see `gmae_jax.models.sparse`), with the same
  parameters as the dense encoder;
- `pos_embed` is added before the blocks in both stages (except in 'original' mode), so it
  transfers to fine-tuning.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gmae_jax.models import modules
from gmae_jax.models.masking import hide_masked_pixels
from gmae_jax.models.presets import GMSTConfig, ffn_hidden_dim
from gmae_jax.models.sparse import VisibleGrid


class GMSTEncoder(nn.Module):
    """`patch_embed`, `blocks_{i}`, `norm`; split into `embed` and `encode` so callers can mask."""

    embed_dim: int
    depth: int
    num_heads: int
    ffn_dim: int
    patch_size: int
    overlap: bool = False
    attention_dropout: float = 0.1
    dtype: modules.Dtype = jnp.float32
    remat: str = "none"
    conv_impl: str = "auto"

    def setup(self) -> None:
        self.patch_embed = modules.OverlapPatchEmbed(
            self.embed_dim, self.patch_size, self.overlap, self.dtype, self.conv_impl
        )
        self.blocks = [
            modules.gmst_block_class(self.remat)(
                self.embed_dim, self.num_heads, self.ffn_dim, self.attention_dropout, self.dtype,
                self.conv_impl,
            )
            for _ in range(self.depth)
        ]
        self.norm = modules.layer_norm(dtype=self.dtype)

    def embed(self, images: jax.Array) -> tuple[jax.Array, int, int]:
        return self.patch_embed(images)

    def encode(
        self, tokens: jax.Array, height: int, width: int, train: bool, visible: VisibleGrid | None = None
    ) -> jax.Array:
        """Blocks and final norm; with `visible`, `tokens` are the visible ones (B, L_vis, C)."""
        for block in self.blocks:
            tokens = block(tokens, height, width, train, visible)
        return self.norm(tokens)

    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        tokens, height, width = self.embed(images)
        return self.encode(tokens, height, width, train)


def make_encoder(config: GMSTConfig) -> GMSTEncoder:
    return GMSTEncoder(
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        ffn_dim=ffn_hidden_dim(config.embed_dim, config.mlp_ratio),
        patch_size=config.patch_size,
        overlap=config.overlap_patches,
        attention_dropout=config.attention_dropout,
        dtype=jnp.dtype(config.dtype),
        remat=config.remat,
        conv_impl=config.conv_impl,
        name="encoder",
    )


class GMAE(nn.Module):
    """Masked-autoencoder pretraining model: predicts the pixels of every patch, (B, L, p*p*C).

    The mask (B, L) bool, True = hidden, is an input: sampling it is the train step's job
    (`masking.sample_mask`), which keeps this module deterministic and testable. With
    `mask_mode='sparse'` the encoder's shapes depend on how many patches are visible, so callers
    pass that static count as `num_visible` (`masking.num_visible(L, mask_ratio)`); every row of
    the mask must leave exactly that many visible. Other modes ignore `num_visible`.
    """

    config: GMSTConfig

    def setup(self) -> None:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        self.encoder = make_encoder(c)
        self.pos_embed = self.param("pos_embed", modules.trunc_normal_002, (1, c.num_patches, c.embed_dim))
        if c.mask_mode == "encoder":
            self.encoder_mask_token = self.param(
                "encoder_mask_token", modules.trunc_normal_002, (1, 1, c.embed_dim)
            )
        self.mask_token = self.param("mask_token", modules.trunc_normal_002, (1, 1, c.decoder_embed_dim))
        self.decoder_embed = nn.Dense(c.decoder_embed_dim, kernel_init=modules.xavier_uniform, dtype=dtype)
        self.decoder_pos_embed = self.param(
            "decoder_pos_embed", modules.trunc_normal_002, (1, c.num_patches, c.decoder_embed_dim)
        )
        self.decoder_blocks = [
            modules.gmst_block_class(c.remat)(
                c.decoder_embed_dim,
                c.decoder_num_heads,
                ffn_hidden_dim(c.decoder_embed_dim, c.mlp_ratio),
                c.attention_dropout,
                dtype,
                c.conv_impl,
            )
            for _ in range(c.decoder_depth)
        ]
        self.decoder_norm = modules.layer_norm(dtype=dtype)
        self.decoder_pred = nn.Dense(
            c.patch_size**2 * c.in_channels, kernel_init=modules.xavier_uniform, dtype=dtype
        )

    def encode(
        self, images: jax.Array, mask: jax.Array, train: bool, num_visible: int | None = None
    ) -> jax.Array:
        """Encoder features (B, L, embed_dim) of the visible content only (in 'encoder' mode);
        in 'sparse' mode those of the visible tokens only, (B, num_visible, embed_dim), in the
        ascending grid order of `masking.visible_ids`; in 'original' mode those of the whole image
        without `pos_embed`, which the original adds after the encoder (`__call__`)."""
        if self.config.mask_mode == "sparse":
            return self._encode_visible(images, mask, self._visible_grid(mask, num_visible), train)
        hide = self.config.mask_mode == "encoder"
        if hide:
            images = hide_masked_pixels(images, mask, self.config.patch_size)
        tokens, height, width = self.encoder.embed(images)
        if hide:
            tokens = jnp.where(mask[..., None], self.encoder_mask_token.astype(tokens.dtype), tokens)
        if self.config.mask_mode != "original":
            tokens = tokens + self.pos_embed
        return self.encoder.encode(tokens, height, width, train)

    def _visible_grid(self, mask: jax.Array, num_visible: int | None) -> VisibleGrid:
        grid = self.config.img_size // self.config.patch_size
        if num_visible is None:
            if not self.is_initializing():
                raise ValueError(
                    "mask_mode='sparse' needs the static number of visible patches per example: "
                    "pass num_visible=masking.num_visible(num_patches, mask_ratio)")
            num_visible = mask.shape[1]  # parameter shapes do not depend on the count
        return VisibleGrid.from_mask(mask, num_visible, grid, grid)

    def _encode_visible(
        self, images: jax.Array, mask: jax.Array, visible: VisibleGrid, train: bool
    ) -> jax.Array:
        """The sparse encoder: zeroed masked pixels (overlapping windows reach into them), the
        patch embedding, then blocks on the visible tokens with their position embeddings."""
        images = hide_masked_pixels(images, mask, self.config.patch_size)
        tokens, height, width = self.encoder.embed(images)
        tokens = visible.gather(tokens + self.pos_embed)
        return self.encoder.encode(tokens, height, width, train, visible)

    def __call__(
        self, images: jax.Array, mask: jax.Array, train: bool, num_visible: int | None = None
    ) -> jax.Array:
        grid = self.config.img_size // self.config.patch_size
        if self.config.mask_mode == "sparse":
            # The decoder runs dense: visible encoder outputs go back to their cells, mask_token
            # fills the rest below.
            visible = self._visible_grid(mask, num_visible)
            x = visible.scatter(self.decoder_embed(self._encode_visible(images, mask, visible, train)))
        else:
            latent = self.encode(images, mask, train)
            if self.config.mask_mode == "original":
                latent = latent + self.pos_embed
            x = self.decoder_embed(latent)
        x = jnp.where(mask[..., None], self.mask_token.astype(x.dtype), x)
        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x, grid, grid, train)
        return self.decoder_pred(self.decoder_norm(x)).astype(jnp.float32)


class GMAEClassifier(nn.Module):
    """Fine-tuning model: patch_embed -> + pos_embed -> blocks -> norm -> mean -> LN -> Linear."""

    config: GMSTConfig
    num_classes: int

    def setup(self) -> None:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        self.encoder = make_encoder(c)
        self.pos_embed = self.param("pos_embed", modules.trunc_normal_002, (1, c.num_patches, c.embed_dim))
        self.head_norm = modules.layer_norm(dtype=dtype)
        self.head = nn.Dense(
            self.num_classes,
            kernel_init=modules.torch_default_kernel,
            bias_init=modules.torch_default_bias(c.embed_dim),
            dtype=dtype,
        )

    def features(self, images: jax.Array, train: bool) -> jax.Array:
        """Encoder output tokens (B, L, embed_dim), after the encoder's final norm."""
        tokens, height, width = self.encoder.embed(images)
        return self.encoder.encode(tokens + self.pos_embed, height, width, train)

    def classify(self, features: jax.Array) -> jax.Array:
        """Logits (B, num_classes) from encoder features: mean over tokens -> LN -> Linear."""
        return self.head(self.head_norm(features.mean(axis=1))).astype(jnp.float32)

    def __call__(self, images: jax.Array, train: bool) -> jax.Array:
        return self.classify(self.features(images, train))
