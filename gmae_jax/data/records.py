"""The prepared-corpus record: one HaGRID record's metadata and its pre-resized JPEG in one blob.

Layout: b'GMR1', uint32 little-endian metadata length, metadata JSON (the HagridRecord fields,
boxes relative to the stored image), JPEG bytes. One self-contained blob per ArrayRecord entry
keeps random access a single read, and needs nothing beyond the standard library to parse.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import json
import struct

from etils import epath
import grain

from gmae_jax.data.class_folders import DataLayoutError
from gmae_jax.data.hagrid import HagridRecord
from gmae_jax.data.transforms import ImageDecodeError

_MAGIC = b"GMR1"
_HEADER = struct.Struct("<4sI")
SHARD_SUFFIX = ".array_record"


class RecordFormatError(ValueError):
    """A blob is not a prepared record (wrong magic or truncated)."""


class ShardError(DataLayoutError):
    """A prepared shard is missing or does not open; the message names it and what to do, `why` is
    array_record's reason alone."""

    def __init__(self, path: epath.PathLike, why: str):
        self.why = why
        super().__init__(f"{path} cannot be read ({why}): rerun the prepare stage that wrote it (the same "
                         "command rewrites missing and damaged shards)")


class UnreadableRecordError(ImageDecodeError):
    """A record inside a shard that opens does not read (a chunk whose hash does not match: flipped
    bits on a disk or in a copy). Loaders count it as an unreadable image; `name` is the record's place."""

    def __init__(self, name: str, why: str):
        self.name = name
        super().__init__(f"{name} cannot be read ({why}); delete that shard and rerun the prepare stage that "
                         "wrote it (it writes missing shards again)")


def count_records(path: epath.PathLike) -> int:
    """The records in one ArrayRecord shard; a missing or damaged shard is a ShardError naming it."""
    try:
        return len(grain.sources.ArrayRecordDataSource([str(path)]))
    except RuntimeError as error:  # what array_record says of a missing, cut or foreign file
        raise ShardError(path, str(error).strip() or "cut short, or no ArrayRecord file") from None


def encode(record: HagridRecord, image: bytes) -> bytes:
    """Serialises a record and its encoded image into one blob."""
    meta = json.dumps(dataclasses.asdict(record), separators=(",", ":")).encode()
    return _HEADER.pack(_MAGIC, len(meta)) + meta + image


def decode(blob: bytes) -> tuple[HagridRecord, bytes]:
    """(record, JPEG bytes) of a blob written by `encode`."""
    if len(blob) < _HEADER.size:
        raise RecordFormatError(f"record of {len(blob)} bytes is shorter than its header")
    magic, size = _HEADER.unpack_from(blob)
    if magic != _MAGIC or len(blob) < _HEADER.size + size:
        raise RecordFormatError("not a gmae_jax prepared record (bad magic or truncated)")
    meta = json.loads(blob[_HEADER.size : _HEADER.size + size])
    return HagridRecord.from_json_dict(meta), blob[_HEADER.size + size :]


class ShardReader:
    """Random access to the records of a list of ArrayRecord shards, decoded to (record, JPEG).

    Wraps grain's ArrayRecordDataSource (which pickles to workers by its paths) so a pipeline
    element looks the same whether it came from a file tree or from shards.
    """

    decoded_once = True  # the prepare stage decoded and resized every image (`sources.Source.decoded_once`)

    def __init__(self, paths: Sequence[epath.PathLike], class_counts: Mapping[str, int] | None = None):
        self.paths = [str(p) for p in paths]
        self.class_counts = class_counts  # images per class, as the prepare stage counted them (None: not known)
        try:
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        except RuntimeError:
            for path in self.paths:
                count_records(path)  # a ShardError naming the shard that does not open
            raise

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[HagridRecord, bytes]:
        try:
            blob = self._source[index]
        except RuntimeError as error:  # array_record's word for a damaged chunk
            raise UnreadableRecordError(self._place(index), str(error).strip().splitlines()[0]) from None
        return decode(blob)

    def _place(self, index: int) -> str:
        """'record I of SHARD' for a global index (only on an error: it opens every shard's footer)."""
        first = 0
        for path in self.paths:
            count = count_records(path)
            if index < first + count:
                return f"record {index - first} of {path}"
            first += count
        return f"record {index} of {len(self.paths)} shards"

    def __repr__(self) -> str:
        return f"ShardReader({len(self.paths)} shards, first {self.paths[:1]})"
