"""Test setup: 8 simulated CPU devices (as CI runs) and parsed absl flags (grain workers need them)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
