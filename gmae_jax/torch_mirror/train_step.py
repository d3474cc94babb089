"""Eager PyTorch training steps of the mirror model, the baseline that the JAX steps are timed against.

They do what `gmae_jax.train.steps` does: sample a mask with an exact masked count per row, masked-patch
MSE (pretraining) or label-smoothed cross-entropy (fine-tuning), global-norm clipping, then AdamW with
weight decay on conv/linear kernels only. float32 on CPU; on a CUDA device the forward runs under
bfloat16 autocast, the usual PyTorch mixed-precision recipe. Imports torch (the `[torch]` extra).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from gmae_jax.models.masking import num_masked
from gmae_jax.models.presets import GMSTConfig
from gmae_jax.torch_mirror import modules as mirror

Step = Callable[[], float]


def _patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), pixel order row, column, channel (as `masking.patchify`)."""
    batch, channels, height, width = images.shape
    x = images.reshape(batch, channels, height // patch_size, patch_size, width // patch_size, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, -1, patch_size * patch_size * channels)


def _sample_mask(batch: int, num_patches: int, mask_ratio: float, device: torch.device) -> torch.Tensor:
    ranks = torch.rand(batch, num_patches, device=device).argsort(1).argsort(1)
    return ranks < num_masked(num_patches, mask_ratio)


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW that decays conv/linear weights only (the JAX side's `weight_decay_mask`)."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.ndim > 1)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_step(
    config: GMSTConfig, task: str, batch_size: int, *, num_classes: int = 10, mask_ratio: float = 0.6,
    lr: float = 1e-4, weight_decay: float = 0.05, grad_clip: float = 1.0, seed: int = 0, bfloat16: bool = True,
) -> tuple[torch.nn.Module, Step]:
    """(model, step) for `task` 'pretrain' or 'finetune' on a fixed random batch; `step()` runs one
    optimiser step and returns the loss (which waits for the device). On a GPU, `bfloat16` computes
    under bf16 autocast (float32 weights, as the JAX step's bf16 compute); CPUs compute in float32."""
    device = _device()
    torch.manual_seed(seed)
    if task == "pretrain":
        model = mirror.GMAE(config)
    elif task == "finetune":
        model = mirror.GMAEForClassification(config, num_classes)
    else:
        raise ValueError(f"task must be 'pretrain' or 'finetune', got {task!r}")
    model = model.to(device).train()
    optimizer = _optimizer(model, lr, weight_decay)
    rng = np.random.default_rng(seed)
    shape = (batch_size, config.in_channels, config.img_size, config.img_size)
    images = torch.from_numpy(rng.normal(size=shape).astype(np.float32)).to(device)
    labels = torch.from_numpy(rng.integers(0, num_classes, batch_size)).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and bfloat16)

    def loss() -> torch.Tensor:
        if task == "finetune":
            return F.cross_entropy(model(images).float(), labels, label_smoothing=0.1)
        mask = _sample_mask(batch_size, config.num_patches, mask_ratio, device)
        pred = model(images, mask).float()
        per_patch = (pred - _patchify(images, config.patch_size)).square().mean(-1)
        weights = mask.float()
        return (per_patch * weights).sum() / weights.sum().clamp_min(1.0)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            value = loss()
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return value.item()

    return model, step
