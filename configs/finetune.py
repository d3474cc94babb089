"""Fine-tunes the pretrained encoder as a gesture classifier (all layers train; nothing is frozen).

  python -m gmae_jax.main --config=configs/finetune.py:model=small --workdir=/tmp/finetune \
      --config.data.root=data/finetune_dataset --config.init_from=/tmp/pretrain

Fields and defaults not set here: gmae_jax/schema.py.
"""

import ml_collections

from gmae_jax import config_lib, schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, model="", runlocal=False)
    config = config_lib.training_config(
        "finetune", config_lib.training_preset(arg),
        loop=schema.LoopConfig(num_epochs=100.0, best_metric="accuracy", best_mode="max"),
        optim=schema.OptimConfig(warmup_steps=500, weight_decay=0.01, layer_decay=0.75),
        data=config_lib.data_section("data/finetune_dataset"))
    config.num_classes = 18  # HaGRID v1 gestures, as the original; must match the class folders
    # Workdir (or its checkpoints folder) of a pretraining run (or a fine-tuned or imported one: its
    # encoder and pos_embed); '' trains from scratch.
    config.init_from = ""
    config.label_smoothing = 0.1
    # Linear probing: train only the head on a frozen encoder (the original froze it for good;
    # here it is a choice, and the standard cheap measure of what pretraining learned).
    config.freeze_encoder = False
    # Few-label fine-tuning: train on this many images per class of the training split, drawn with
    # subset_seed (gmae_jax/data/subsets.py); 0 = all of it. The validation split is always whole.
    config.labels_per_class = 0
    config.subset_seed = 0

    if arg.runlocal:
        config_lib.make_runlocal(config)
    return config
