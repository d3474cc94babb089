"""What the ml-collections configs in `configs/` are built from: variant parsing, model presets and
the sections each schema dataclass declares. No JAX: a config file loads without starting it (the
checks of a config's values are `config_checks`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import ml_collections

from gmae_jax import schema
from gmae_jax.models.presets import PRESETS, GMSTConfig
from gmae_jax.schema import ConfigError

# ConfigError is defined with the defaults (gmae_jax.schema) so that every layer can raise it; it is
# re-exported here, where the config files and stages look for it.


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses the text after ':' in `--config=file.py:model=small,runlocal` into typed values.

    A bare name sets a boolean default to True; values take the type of their default.
    """
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, raw = item.partition("=")
        if key not in defaults:
            known = f"known: {sorted(defaults)}" if defaults else "this config file takes none"
            raise ConfigError(f"unknown config variant '{key}'; {known}")
        default = defaults[key]
        if not sep:
            values[key] = True
        elif isinstance(default, bool):
            values[key] = _boolean_variant(key, raw)
        else:
            try:
                values[key] = type(default)(raw)
            except ValueError:
                raise ConfigError(f"config variant {key}={raw!r} is not a {type(default).__name__}") from None
    return ml_collections.ConfigDict(values)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _boolean_variant(key: str, raw: str) -> bool:
    """A typo (`runlocal=ture`) must not quietly mean False: that is the full run, not the smoke run."""
    if raw.lower() in _TRUE + _FALSE:
        return raw.lower() in _TRUE
    raise ConfigError(f"config variant {key}={raw!r} is not true or false; write {key} alone for true, or "
                      f"{key}=false")


def model_section(preset: str, **overrides: Any) -> ml_collections.ConfigDict:
    """All architecture fields of `preset` (see `gmae_jax.models.presets`), so each is overridable."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset '{preset}'; choose one of {sorted(PRESETS)}")
    fields = dataclasses.asdict(GMSTConfig())
    fields.update(PRESETS[preset])
    fields.update(overrides)
    return ml_collections.ConfigDict({"preset": preset, **fields})


def data_section(root: str, **aug: Any) -> ml_collections.ConfigDict:
    """The `config.data` section of the training stages (defaults: `schema.DataConfig`), with the
    augmentation fields in `aug` changed."""
    return schema.to_config_dict(schema.DataConfig(root=root, aug=schema.AugmentConfig(**aug)))


def training_config(stage: str, preset: str, loop: schema.LoopConfig, optim: schema.OptimConfig,
                    data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """What pretrain and finetune configs share: the stage, model, loop fields, optimiser, data,
    mesh and logging sections, each from its schema dataclass."""
    config = ml_collections.ConfigDict()
    config.stage = stage
    config.model = model_section(preset)
    config.update(dataclasses.asdict(loop))
    config.optim = schema.to_config_dict(optim)
    config.data = data
    config.mesh = schema.to_config_dict(schema.MeshConfig())
    config.wandb = schema.to_config_dict(schema.WandbConfig())
    return config


def training_preset(arg: ml_collections.ConfigDict) -> str:
    """The model preset of a training config's variants: `model=` where given, else `micro` under
    `runlocal` (a smoke run) and `small` otherwise."""
    return arg.model or ("micro" if arg.runlocal else "small")


def make_runlocal(config: ml_collections.ConfigDict) -> None:
    """The `runlocal` variant: a few steps in the main process (smoke tests); its model comes from
    `training_preset`."""
    config.data.num_workers = 0
    config.batch_size = 16
    config.total_steps = 20
    config.optim.warmup_steps = 5
    config.log_every = 5
    config.eval_every = 10
    config.checkpoint_every = 10


def load_sibling_config(config_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of another file in the same configs folder (how demo.py reuses the stages)."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"gmae_jax_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
