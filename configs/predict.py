"""Top-k gesture predictions of a fine-tuned classifier for an image, a folder or a HaGRID tree.

  python -m gmae_jax.main --config=configs/predict.py --workdir=/tmp/predict \
      --config.checkpoint_dir=/tmp/finetune --config.inputs=photos/

Writes predictions.csv, predictions.jsonl, predictions.png (the first inputs as the classifier saw them,
with their top class) and skipped.csv (files that are not images or do not decode, with the reason).
Classes come from CHECKPOINT_DIR/classes.json.
"""

import ml_collections

from gmae_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config_lib.parse_arg(arg)  # no variants: anything after ':' is an error
    config = ml_collections.ConfigDict()
    config.stage = "predict"
    config.checkpoint_dir = ""  # workdir of a finetune run
    config.checkpoint = "latest"  # 'latest', 'best' (by the run's config.best_metric) or a step
    config.inputs = ""  # an image file, a folder (searched recursively) or a HaGRID v1 / v2 tree
    # 'auto': the view the run was evaluated with (its run.json): 'original' (the centre crop of
    # class-folder runs), 'full_frame' (letterbox) or 'hand_crop' (around the annotated gesture of a
    # HaGRID tree); or force one of the three.
    config.view = "auto"
    config.top_k = 5
    config.batch_size = 64
    config.num_workers = 4  # decoding threads: -1 = one per core this process may use, 0 = this thread alone
    return config
