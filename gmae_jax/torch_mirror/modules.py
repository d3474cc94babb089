"""A PyTorch mirror of the original G-MAE modules, with the original's exact `state_dict` names.

It exists to check that an exported checkpoint loads with `strict=True` into the original's layout and
computes what the Flax model computes. Module tree, names and initialisation follow the original (see
the project's notes on it); the forwards follow `gmae_jax.models.gmae`: masking happens before the
encoder and `pos_embed` is added before the blocks (in `mask_mode='original'` the pretraining model
computes the original's forward: no masking before the encoder, `pos_embed` after it). Layout is
NCHW for images, (B, N, C) for tokens.

This module and `exported.py` are the package's torch side (the optional `[torch]` extra); they
import no JAX, so a deployment needs only torch, numpy and Pillow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gmae_jax.models.presets import GMSTConfig, ffn_hidden_dim, patch_embed_geometry


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C) in row-major order."""
    return x.flatten(2).transpose(1, 2)


def _image(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H*W, C) row-major tokens -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


def _hide(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(B, C, H, W) with masked cells zero: what the sparse encoder's convolutions read there."""
    return x if keep is None else x * keep


def _conv_bn_gelu(in_channels: int, out_channels: int, kernel_size: int, dilation: int) -> nn.Sequential:
    """The original's branch: Conv -> BN -> GELU as a Sequential (keys `.0.`, `.1.`)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size,
                  padding=dilation * (kernel_size // 2), dilation=dilation),
        nn.BatchNorm2d(out_channels),
        nn.GELU(),
    )


def _branch(layers: nn.Sequential, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Conv -> BN -> GELU; with `keep` (the sparse encoder) in training, BatchNorm's statistics are
    those of the visible cells, as the sparse encoder's BatchNorm sees only those."""
    conv, norm, gelu = layers
    if keep is None or not norm.training:
        return layers(x)
    return gelu(_visible_batch_norm(norm, conv(x), keep))


def _visible_batch_norm(norm: nn.BatchNorm2d, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Training-mode BatchNorm2d over the cells where `keep` (B, 1, H, W) is 1, PyTorch's way: two-pass
    biased variance to normalise, the unbiased one into `running_var`."""
    count = keep.sum() * 1.0
    mean = (x * keep).sum((0, 2, 3)) / count
    centred = x - mean[:, None, None]
    var = (centred.square() * keep).sum((0, 2, 3)) / count
    with torch.no_grad():
        norm.running_mean.lerp_(mean, norm.momentum)
        norm.running_var.lerp_(var * count / (count - 1), norm.momentum)
        norm.num_batches_tracked.add_(1)
    scale = norm.weight * torch.rsqrt(var + norm.eps)
    return centred * scale[:, None, None] + norm.bias[:, None, None]


def _init_conv_bn_linear(module: nn.Module) -> None:
    """MSDC's and MSC_FFN's own init: Kaiming-normal (fan_out) convs, unit BN, Xavier Linear."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def _trunc_normal_002(tensor: torch.Tensor) -> torch.Tensor:
    """The original's `trunc_normal_(std=.02)`: cut at +-2 absolute, i.e. in effect a normal of std 0.02."""
    return nn.init.trunc_normal_(tensor, std=0.02)


class OverlapPatchEmbed(nn.Module):
    """`proj` conv -> row-major tokens -> `norm`; geometry shared with the Flax model."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, overlap: bool) -> None:
        super().__init__()
        kernel, stride, padding = patch_embed_geometry(patch_size, overlap)
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(images)
        height, width = x.shape[-2:]
        return self.norm(_tokens(x)), height, width


class MSDC(nn.Module):
    """Multi-scale dilated conv with spatial and squeeze-excite attention; residual inside."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        branch = dim // 4
        self.conv1x1 = _conv_bn_gelu(dim, branch, 1, 1)
        self.dconv1 = _conv_bn_gelu(dim, branch, 3, 1)
        self.dconv2 = _conv_bn_gelu(dim, branch, 3, 2)
        self.dconv3 = _conv_bn_gelu(dim, branch, 3, 3)
        self.fusion = _conv_bn_gelu(4 * branch, dim, 1, 1)
        self.sa_conv = nn.Conv2d(2, 1, 7, padding=3)
        self.se_fc1 = nn.Linear(dim, dim // 16)
        self.se_fc2 = nn.Linear(dim // 16, dim)
        _init_conv_bn_linear(self)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """With `keep` (B, 1, H, W), 1 at visible cells: the sparse encoder's MSDC at those cells."""
        h = _hide(x, keep)  # the 1x1 fusion reads its own cell only: no hiding needed before it
        branches = [_branch(layers, h, keep) for layers in (self.conv1x1, self.dconv1, self.dconv2, self.dconv3)]
        m = _branch(self.fusion, torch.cat(branches, 1), keep)
        pooled = torch.cat([m.mean(1, keepdim=True), m.amax(1, keepdim=True)], 1)
        s = m * torch.sigmoid(self.sa_conv(_hide(pooled, keep)))
        squeezed = s.mean((2, 3)) if keep is None else (s * keep).sum((2, 3)) / keep.sum((2, 3))
        e = torch.sigmoid(self.se_fc2(F.gelu(self.se_fc1(squeezed))))
        return s * e[:, :, None, None] + x


class MSC_FFN(nn.Module):  # noqa: N801 -- the original's class name
    """Three dilated 3x3 branches -> 1x1 fusion -> tokens -> fc1 -> GELU -> fc2; no residual."""

    def __init__(self, dim: int, hidden: int, out: int) -> None:
        super().__init__()
        branch = hidden // 3
        self.dconv1 = _conv_bn_gelu(dim, branch, 3, 1)
        self.dconv2 = _conv_bn_gelu(dim, branch, 3, 2)
        self.dconv3 = _conv_bn_gelu(dim, branch, 3, 3)
        self.fusion = _conv_bn_gelu(3 * branch, hidden, 1, 1)
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, out)
        _init_conv_bn_linear(self)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = _hide(x, keep)
        branches = [_branch(layers, x, keep) for layers in (self.dconv1, self.dconv2, self.dconv3)]
        h = _branch(self.fusion, torch.cat(branches, 1), keep)
        return self.fc2(F.gelu(self.fc1(_tokens(h))))


class GMSTBlock(nn.Module):
    """MSDC -> self-attention -> MSC-FFN with layer scales, post-norm `norm3`; `norm2` is unused."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.msdc = MSDC(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mscffn = MSC_FFN(dim, ffn_dim, dim)
        self.norm3 = nn.LayerNorm(dim)
        self.gamma1 = nn.Parameter(nn.init.normal_(torch.empty(dim), 1.0, 0.02))
        self.gamma2 = nn.Parameter(nn.init.normal_(torch.empty(dim), 1.0, 0.02))
        self.gamma3 = nn.Parameter(nn.init.normal_(torch.empty(dim), 1.0, 0.02))

    def forward(self, x: torch.Tensor, height: int, width: int, keep: torch.Tensor | None = None) -> torch.Tensor:
        """With `keep` (B, 1, H, W), the sparse encoder's block computed densely: its outputs at visible
        cells are the sparse ones (masked cells hold zero for the convolutions and are no keys of the
        attention); at masked cells they mean nothing."""
        x = x + self.gamma1 * _tokens(self.msdc(_image(x, height, width), keep))
        h = self.norm1(x)
        hidden = None if keep is None else keep.flatten(1) == 0
        x = x + self.gamma2 * self.attn(h, h, h, key_padding_mask=hidden, need_weights=False)[0]
        return self.norm3(x + self.gamma3 * self.mscffn(_image(x, height, width), keep))


class GMSTEncoder(nn.Module):
    """`patch_embed`, `blocks`, `norm`; `embed` and `encode` are separate so callers can mask."""

    def __init__(self, config: GMSTConfig) -> None:
        super().__init__()
        c = config
        self.patch_embed = OverlapPatchEmbed(c.in_channels, c.embed_dim, c.patch_size, c.overlap_patches)
        ffn_dim = ffn_hidden_dim(c.embed_dim, c.mlp_ratio)
        self.blocks = nn.ModuleList(
            GMSTBlock(c.embed_dim, c.num_heads, ffn_dim, c.attention_dropout) for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.embed_dim)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        return self.patch_embed(images)

    def encode(self, tokens: torch.Tensor, height: int, width: int, keep: torch.Tensor | None = None
               ) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens, height, width, keep)
        return self.norm(tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(*self.embed(images))


class GMAE(nn.Module):
    """Pretraining model; `forward(images, mask)` -> per-patch pixels (B, L, p*p*C), as Flax's GMAE.

    `encoder_mask_token` exists only with `mask_mode='encoder'` (gmae_jax's leak-free masking).
    `mask_mode='sparse'` is computed densely: masked cells hold zero for every convolution and are no
    attention keys, and training BatchNorm statistics are those of the visible cells, so visible tokens
    get the sparse encoder's outputs.
    """

    def __init__(self, config: GMSTConfig) -> None:
        super().__init__()
        c = self.config = config
        self.encoder = GMSTEncoder(c)
        self.pos_embed = nn.Parameter(_trunc_normal_002(torch.empty(1, c.num_patches, c.embed_dim)))
        if c.mask_mode == "encoder":
            self.encoder_mask_token = nn.Parameter(_trunc_normal_002(torch.empty(1, 1, c.embed_dim)))
        self.mask_token = nn.Parameter(_trunc_normal_002(torch.empty(1, 1, c.decoder_embed_dim)))
        self.decoder_embed = nn.Linear(c.embed_dim, c.decoder_embed_dim)
        self.decoder_pos_embed = nn.Parameter(
            _trunc_normal_002(torch.empty(1, c.num_patches, c.decoder_embed_dim))
        )
        ffn_dim = ffn_hidden_dim(c.decoder_embed_dim, c.mlp_ratio)
        self.decoder_blocks = nn.ModuleList(
            GMSTBlock(c.decoder_embed_dim, c.decoder_num_heads, ffn_dim, c.attention_dropout)
            for _ in range(c.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(c.decoder_embed_dim)
        self.decoder_pred = nn.Linear(c.decoder_embed_dim, c.patch_size**2 * c.in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """The original re-initialises every Linear (MHA's out_proj too) and LayerNorm model-wide."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c = self.config
        grid = c.img_size // c.patch_size
        hide = c.mask_mode in ("encoder", "sparse")
        if hide:
            pixels = mask.reshape(-1, 1, grid, grid)
            pixels = pixels.repeat_interleave(c.patch_size, 2).repeat_interleave(c.patch_size, 3)
            images = images.masked_fill(pixels, 0.0)
        tokens, height, width = self.encoder.embed(images)
        if c.mask_mode == "encoder":
            tokens = torch.where(mask[..., None], self.encoder_mask_token, tokens)
        if c.mask_mode == "original":  # the original adds it after the encoder
            latent = self.encoder.encode(tokens, height, width) + self.pos_embed
        elif c.mask_mode == "sparse":
            keep = (~mask).reshape(-1, 1, grid, grid).to(tokens.dtype)
            latent = self.encoder.encode(tokens + self.pos_embed, height, width, keep)
        else:
            latent = self.encoder.encode(tokens + self.pos_embed, height, width)
        x = self.decoder_embed(latent)
        x = torch.where(mask[..., None], self.mask_token, x) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x, grid, grid)
        return self.decoder_pred(self.decoder_norm(x))


class GMAEForClassification(nn.Module):
    """Fine-tuning model: patch_embed -> + pos_embed -> blocks -> norm -> mean -> `classifier`."""

    def __init__(self, config: GMSTConfig, num_classes: int) -> None:
        super().__init__()
        c = config
        self.encoder = GMSTEncoder(c)
        self.pos_embed = nn.Parameter(_trunc_normal_002(torch.empty(1, c.num_patches, c.embed_dim)))
        self.classifier = nn.Sequential(nn.LayerNorm(c.embed_dim), nn.Linear(c.embed_dim, num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder output tokens (B, L, embed_dim), after the encoder's final norm."""
        tokens, height, width = self.encoder.embed(images)
        return self.encoder.encode(tokens + self.pos_embed, height, width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).mean(1))
