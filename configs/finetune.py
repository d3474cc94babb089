"""Fine-tunes the pretrained encoder as a gesture classifier (every layer trains, with layer-wise lr decay;
--config.freeze_encoder=True trains the head alone: a linear probe).

  python -m gmae_jax.main --config=configs/finetune.py:model=small --workdir=/tmp/finetune \
      --config.data.root=data/finetune_dataset --config.init_from=/tmp/pretrain

Fields and defaults not set here: gmae_jax/schema.py.
"""

import dataclasses

import ml_collections

from gmae_jax import config_lib, schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, model="", runlocal=False)
    config = config_lib.training_config(
        "finetune", config_lib.training_preset(arg),
        loop=schema.LoopConfig(num_epochs=100.0, best_metric="accuracy", best_mode="max"),
        optim=schema.OptimConfig(warmup_steps=500, weight_decay=0.01, layer_decay=0.75),
        data=config_lib.data_section("data/finetune_dataset"))
    # num_classes, init_from (a pretraining run), label_smoothing, freeze_encoder (linear probing),
    # labels_per_class and subset_seed (few-label fine-tuning): schema.FinetuneConfig.
    config.update(dataclasses.asdict(schema.FinetuneConfig()))

    if arg.runlocal:
        config_lib.make_runlocal(config)
    return config
