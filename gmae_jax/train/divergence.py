"""A diverged run stops with one line (what to change, where its last good checkpoint is) before it
can overwrite that checkpoint with NaNs."""

from __future__ import annotations

import math


class TrainingDivergedError(FloatingPointError):
    """A loss or gradient norm became NaN or infinite: the settings' doing (a user error), not a bug."""


def check_finite(metrics: dict[str, float], step: int, checkpoint_dir: str, last_saved: int | None,
                 dtype: str = "float32", last_read: int | None = None) -> None:
    """Stops a diverged run before it can overwrite a good checkpoint with NaNs. `last_read`: the
    step whose metrics were last read finite, when these were not read at every step since (training
    reads them at log and save steps only): the divergence then lies somewhere after it."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        when = (f"at one of steps {last_read + 1}-{step} (read at step {step})"
                if last_read is not None and last_read < step - 1 else f"at step {step}")
        where = (f"the last good checkpoint is step {last_saved} in {checkpoint_dir} (a restart resumes from it; "
                 "its values are finite, but a run already diverging there fails again from it at any rate: then "
                 "start anew with another --workdir)") if last_saved is not None else "no checkpoint was saved yet"
        remedies = ["lower --config.optim.lr", "keep --config.optim.grad_clip > 0"]
        if dtype != "float32":
            remedies.append(f"use --config.model.dtype=float32 (this run computes in {dtype})")
        raise TrainingDivergedError(
            f"{', '.join(bad)} became non-finite {when}; {where}. To train on: "
            f"{', '.join(remedies[:-1])} or {remedies[-1]}."
        )
