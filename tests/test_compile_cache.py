"""Which folder the entry point gives XLA's persistent compilation cache, and what it reports."""

import os

from gmae_jax import compile_cache


def test_the_flag_wins_then_the_environment_then_the_default():
    env = {"JAX_COMPILATION_CACHE_DIR": "/env/cache"}
    assert compile_cache.resolve("/flag/cache", env) == "/flag/cache"
    assert compile_cache.resolve(None, env) == "/env/cache"
    assert compile_cache.resolve(None, {}) == os.path.expanduser(compile_cache.DEFAULT_DIR)
    assert not compile_cache.resolve(None, {}).startswith("~")


def test_none_or_empty_turns_it_off_and_bucket_paths_stay_as_given():
    assert compile_cache.resolve("none", {"JAX_COMPILATION_CACHE_DIR": "/env"}) is None
    assert compile_cache.resolve("", {}) is None
    assert compile_cache.resolve(None, {"JAX_COMPILATION_CACHE_DIR": "NONE"}) is None
    assert compile_cache.resolve("gs://bucket/xla", {}) == "gs://bucket/xla"


def test_the_summary_says_what_was_read():
    assert compile_cache.CacheUse(None).summary() == "XLA compilation cache off"
    use = compile_cache.CacheUse("/c", programs_read=3, seconds_saved=41.6)
    assert use.summary() == "XLA compilation cache /c: 3 compiled program(s) read (~42 s of compiling saved)"


def test_a_folder_that_cannot_be_written_is_named_with_the_reason(tmp_path):
    assert compile_cache.writable(str(tmp_path / "new" / "cache")) is None  # created on the way
    assert (tmp_path / "new" / "cache").is_dir() and not any((tmp_path / "new" / "cache").iterdir())
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert compile_cache.writable(str(blocker / "cache")) == "NotADirectoryError: Not a directory"
    assert compile_cache.writable("gs://bucket/xla") is None  # JAX itself warns if a bucket write fails
