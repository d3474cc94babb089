"""What the entry points (main, bench) leave out of their logs: other libraries' chatter about what
is so by design. Knows log records, nothing of the product."""

from __future__ import annotations

import logging as pylogging
import os


class QuietLibraries(pylogging.Filter):
    """Keeps orbax's per-save INFO chatter out of the progress output. Warnings still pass, except
    those about what is so by design: checkpoints saved between evaluations carry no metric,
    evaluate / predict open the checkpoints read-only, and orbax looks for a metadata file inside
    each item of a step (`checkpoints/N/state/`) that it writes only for the step itself. JAX's INFO
    line about each platform it probed and did not find ("Unable to initialize backend 'tpu'" on
    every GPU or CPU machine) goes too: the next line says which platform the run uses."""

    _EXPECTED = ("did not provide metrics", "read_only=True", "is read only")
    _NO_METADATA = "Metadata file does not exist:"

    def filter(self, record: pylogging.LogRecord) -> bool:
        if "/fsspec/" in record.pathname or "/gcsfs/" in record.pathname:  # INFO per file opened on gs://
            return record.levelno >= pylogging.WARNING
        if record.pathname.endswith("xla_bridge.py") and record.levelno < pylogging.WARNING:
            return not record.getMessage().startswith("Unable to initialize backend")
        if "/orbax/" not in record.pathname:
            return True
        message = record.getMessage()
        if message.startswith(self._NO_METADATA):
            folder = os.path.dirname(message[len(self._NO_METADATA):].strip())
            return not os.path.basename(os.path.dirname(folder)).isdigit()  # shown unless in an item of a step
        return record.levelno >= pylogging.WARNING and not any(text in message for text in self._EXPECTED)
