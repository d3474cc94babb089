"""Label-efficiency study: does pretraining pay off with few labels?

  python -m gmae_jax.main --config=configs/study.py:model=small --workdir=/tmp/study \
      --config.pretrain_data=data/pretrain_dataset --config.data.root=data/finetune_dataset

Pretrains once on `pretrain_data` (or takes the pretraining run `init_from`), then for each
labels_per_class and seed fine-tunes from scratch, from the pretrained encoder and (linear_probe)
a frozen pretrained encoder with the same budget, on a seeded class-balanced subset of the
labelled training split, and scores every run on the whole validation split. Writes
label_efficiency.json / .png and prints a table. Re-running skips the runs that finished.

Variants after ':': model=<preset>, runlocal (a few steps per run; the micro model unless model= is given).
The recipes are configs/pretrain.py and configs/finetune.py, under `config.pretrain` and
`config.finetune` (e.g. --config.pretrain.mask_ratio=0.75 --config.finetune.total_steps=500).
"""

import ml_collections

from gmae_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, model="", runlocal=False)
    variant = f"model={config_lib.training_preset(arg)}" + (",runlocal" if arg.runlocal else "")
    config = ml_collections.ConfigDict()
    config.stage = "study"
    # Unlabelled images for pretraining (any layout the pretrain stage reads; labels are not used).
    config.pretrain_data = ""
    # Or an existing pretraining run (its workdir or checkpoints folder): then nothing is pretrained.
    config.init_from = ""
    config.labels_per_class = (5, 10, 25, 0)  # 0 = every labelled training image
    config.seeds = (0, 1, 2)  # each picks the subset, the head's initialisation and the batch order
    config.linear_probe = True  # also train only a head on the frozen pretrained encoder

    config.pretrain = config_lib.load_sibling_config(__file__, "pretrain", variant)
    finetune = config_lib.load_sibling_config(__file__, "finetune", variant)
    # The labelled set, <root>/{train,val}/<class>/... or any layout finetune reads; the number of
    # classes is taken from it.
    config.data = finetune.data
    del finetune["data"]
    # One fixed budget per run, the same for every init, so only the starting point differs.
    finetune.total_steps = finetune.total_steps if arg.runlocal else 1000
    finetune.eval_every = 0  # evaluate once, at the end: the study reports the final model
    finetune.best_metric = ""
    finetune.keep_checkpoints = 1
    config.finetune = finetune
    return config
