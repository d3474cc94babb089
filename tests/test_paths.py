"""Paths as users type them: `~` the shell left alone, and storage gmae_jax cannot reach, caught
before a stage starts (not as a traceback after training)."""

import os
import re

import pytest

from gmae_jax import compile_cache, config_lib, paths
from gmae_jax.schema import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def finetune_config():
    return config_lib.load_sibling_config(os.path.join(REPO, "configs", "x.py"), "finetune", "runlocal")


def test_a_tilde_the_shell_did_not_expand_is_the_home_folder(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    config = finetune_config()
    config.data.root, config.init_from = "~/data/hagrid", "gs://bucket/~pretrain"
    assert paths.checked(config, "~/runs/ft") == "/home/someone/runs/ft"
    assert config.data.root == "/home/someone/data/hagrid"
    assert config.init_from == "gs://bucket/~pretrain"  # only a leading ~ is the home folder
    assert paths.checked(config, "runs/~ft") == "runs/~ft"


@pytest.mark.parametrize("field, value, message", [
    ("data.root", "gcs://bucket/hagrid", "config.data.root='gcs://bucket/hagrid': gcs:// is not storage gmae_jax "
                                         "reads or writes; use a local path or gs://BUCKET/PATH"),
    ("init_from", "s3://bucket/run", "config.init_from='s3://bucket/run': s3:// is not storage"),
    ("init_from", "gs:/bucket/run", "config.init_from='gs:/bucket/run' is not a bucket path: write gs://BUCKET/PATH"),
])
def test_a_path_gmae_jax_cannot_reach_names_its_field(field, value, message):
    config = finetune_config()
    *section, name = field.split(".")
    (config[section[0]] if section else config)[name] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        paths.checked(config, "runs/ft")
    with pytest.raises(ConfigError, match="--workdir='gcs://b/run': gcs:// is not storage"):
        paths.checked(finetune_config(), "gcs://b/run")


def test_a_cache_folder_gmae_jax_cannot_reach_is_a_warning_not_a_failure():
    assert "gcs:// is not storage" in compile_cache.writable("gcs://bucket/cache")
    assert compile_cache.writable("gs://bucket/cache") is None
