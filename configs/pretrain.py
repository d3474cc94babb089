"""Masked-autoencoder pretraining on unlabelled gesture images.

  python -m gmae_jax.main --config=configs/pretrain.py:model=small --workdir=/tmp/pretrain \
      --config.data.root=data/pretrain_dataset

Variants after ':': model=<preset> (reference, base, small, tiny, mini, micro; default small), runlocal (a few
steps; the micro model unless model= is given).
Defaults follow the original recipe where it is sane: AdamW, wd 0.05, batch 64, 224 px, patch 16.
Fields and defaults not set here: gmae_jax/schema.py.
"""

import dataclasses

import ml_collections

from gmae_jax import config_lib, schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, model="", runlocal=False)
    config = config_lib.training_config(
        "pretrain", config_lib.training_preset(arg),
        loop=schema.LoopConfig(num_epochs=200.0, eval_every=2000, checkpoint_every=2000,
                               best_metric="loss", best_mode="min"),
        optim=schema.OptimConfig(warmup_steps=1000, weight_decay=0.05),
        data=config_lib.data_section("data/pretrain_dataset", crop_scale_min=0.2))
    config.update(dataclasses.asdict(schema.PretrainConfig()))  # mask_ratio, norm_pix_loss, num_reconstructions

    if arg.runlocal:
        config_lib.make_runlocal(config)
    return config
