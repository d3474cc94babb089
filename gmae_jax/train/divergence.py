"""A diverged run stops with one line (what to change, where its last good checkpoint is) before it
can overwrite that checkpoint with NaNs."""

from __future__ import annotations

import math


class TrainingDivergedError(FloatingPointError):
    """A loss or gradient norm became NaN or infinite: the settings' doing (a user error), not a bug."""


def check_finite(metrics: dict[str, float], step: int, checkpoint_dir: str, last_saved: int | None,
                 dtype: str = "float32") -> None:
    """Stops a diverged run before it can overwrite a good checkpoint with NaNs."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        where = (f"the last good checkpoint is step {last_saved} in {checkpoint_dir} (a restart resumes from it; "
                 "its values are finite, but a run already diverging there fails again from it at any rate: then "
                 "start anew with another --workdir)") if last_saved is not None else "no checkpoint was saved yet"
        remedies = ["lower --config.optim.lr", "keep --config.optim.grad_clip > 0"]
        if dtype != "float32":
            remedies.append(f"use --config.model.dtype=float32 (this run computes in {dtype})")
        raise TrainingDivergedError(
            f"{', '.join(bad)} became non-finite at step {step}; {where}. To train on: "
            f"{', '.join(remedies[:-1])} or {remedies[-1]}."
        )
