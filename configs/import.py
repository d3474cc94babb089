"""Turns a PyTorch .pth into a gmae_jax run folder that --config.init_from and the evaluate stage read.

  python -m gmae_jax.main --config=configs/import.py --workdir=/tmp/imported \
      --config.path=export_dir/model.pth
  python -m gmae_jax.main --config=configs/import.py:model=small --workdir=/tmp/imported \
      --config.path=best_model.pth --config.class_names=call,dislike,fist,...

Reads the `model_state_dict` of either model (classifier or pretraining) from a checkpoint of the
original's training scripts or from our own export, with torch.load(weights_only=True): no pickled
code runs. Our exports carry their architecture; for the original's files the sizes come from
config.model (preset after ':', then --config.model.* overrides).
"""

import ml_collections

from gmae_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, model="reference")
    config = ml_collections.ConfigDict()
    config.stage = "import"
    config.path = ""  # a .pth: {'model_state_dict': ...} or a bare state_dict
    config.model = config_lib.model_section(arg.model)  # an original file's sizes (ours carry theirs)
    config.class_names = ""  # an original classifier's classes in output order, comma-separated
    # The training configs the imported run is written as (what evaluate and init_from read back).
    config.pretrain = config_lib.load_sibling_config(__file__, "pretrain", f"model={arg.model}")
    config.finetune = config_lib.load_sibling_config(__file__, "finetune", f"model={arg.model}")
    return config
