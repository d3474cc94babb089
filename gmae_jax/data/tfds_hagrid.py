"""HaGRID as a TFDS dataset (ArrayRecord files), built and read without TensorFlow.

  tfds build gmae_jax/data/tfds_hagrid.py --manual_dir=/data/hagrid --data_dir=~/tensorflow_datasets

Splits are HaGRID's own (v2: the annotation folders; v1: ann_train_val, or ann_subsample alone,
re-split by user as training splits it, and ann_test). Images are stored pre-resized (shorter side
256) as the prepare stage does, with the record's boxes and labels as JSON; the build's metadata
counts each split's images per class. The stages read a build with `--config.data.root=<data_dir>`
(`config.data.layout=tfds`, detected from `<data_dir>/hagrid_gmae/`), through the same grain pipeline.
"""

from collections import Counter
from collections.abc import Iterator, Mapping
import dataclasses
import json

from etils import epath
import tensorflow_datasets as tfds

from gmae_jax import schema
from gmae_jax.data import hagrid, hagrid_layout, prepare, record_filters, sources
from gmae_jax.data.class_folders import DataLayoutError
from gmae_jax.schema import DataConfig

_STORE = schema.StoreView(view="full_frame", image_side=256)
NAME = sources.TFDS_NAME  # what TFDS names the builder below (its class name in snake case)


class HagridGmae(tfds.core.GeneratorBasedBuilder):
    """HaGRID v1 or v2 from a manual_dir laid out as distributed (see hagrid_format.md)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "metadata: the HaGRID version built from and each split's images per class"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download HaGRID (v2: hagrid_dataset/ and hagrid_annotations/; v1: the class folders and "
        "ann_train_val/, ann_test/) and pass its folder as --manual_dir.")

    def __init__(self, **kwargs):
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # Labels use the v2 list: its first 18 entries and no_gesture are the v1 classes' names.
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=list(hagrid_layout.HAGRID_V2_CLASSES)),
                "record": tfds.features.Text(),  # HagridRecord fields as JSON
            }),
            metadata=tfds.core.MetadataDict(),  # filled in by _split_generators
        )  # fmt: skip

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        root = epath.Path(dl_manager.manual_dir)
        layout = hagrid_layout.detect_layout(root)
        if layout == "hagrid_v2":
            recs, _ = hagrid.read_hagrid_v2(root)
            parts = sources.hagrid_splits(recs, "hagrid_v2", hagrid_layout.V2_SPLITS, DataConfig())
        else:  # ann_train_val (or ann_subsample alone) split by person as training splits it, and ann_test
            train_val, _ = hagrid.read_hagrid_v1(root, hagrid_layout.v1_train_val_set(root))
            parts = sources.hagrid_splits(train_val, "hagrid_v1", ("train", "val"), DataConfig())
            if (root / "ann_test").is_dir():
                parts["test"] = hagrid.read_hagrid_v1(root, "ann_test")[0]
        counts = {split: Counter(filter(None, map(_gesture_of, rs))) for split, rs in parts.items()}
        counts = {split: dict(sorted(c.items())) for split, c in counts.items() if c}
        self.info.metadata.update(hagrid_version=layout, class_counts=counts)
        return {split: self._generate_examples(parts[split]) for split in counts}

    def _generate_examples(self, recs: list[hagrid.HagridRecord]) -> Iterator[tuple[str, dict]]:
        for record in recs:
            if _gesture_of(record) is None:
                continue  # an unannotated gesture: never guess a label
            stored, jpeg = prepare.store_image(record, _STORE)
            yield f"{record.class_folder}/{record.image_id}", {
                "image": jpeg,
                "label": record_filters.gesture_name(record),
                "record": json.dumps(dataclasses.asdict(stored)),
            }


def _gesture_of(record: hagrid.HagridRecord) -> str | None:
    """The record's full-frame gesture if it is one of HaGRID's (v1's are among v2's), else None."""
    label = record_filters.gesture_label(record, hagrid_layout.HAGRID_V2_CLASSES)
    return None if label is None else hagrid_layout.HAGRID_V2_CLASSES[label]


@dataclasses.dataclass(frozen=True)
class Build:
    """What a build's metadata says: the HaGRID layout it was built from, and per split the images
    of each class (so that no stage reads a whole split to count its classes)."""

    layout: str  # 'hagrid_v1' or 'hagrid_v2'
    class_counts: Mapping[str, Mapping[str, int]]


def read_build(data_dir: str) -> Build:
    """The build of this builder's current version under `data_dir`, or a DataLayoutError that says
    how to build it."""
    folder = epath.Path(data_dir) / NAME
    rebuild = (f"build it with `tfds build gmae_jax/data/tfds_hagrid.py --manual_dir=<HaGRID tree> "
               f"--data_dir={data_dir}`")
    builder = HagridGmae(data_dir=data_dir)
    if not builder.is_prepared():
        versions = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        found = f"holds versions {versions} of {NAME}" if versions else f"holds no finished build of {NAME}"
        raise DataLayoutError(f"{data_dir} {found}, not {HagridGmae.VERSION} (what this gmae_jax reads); {rebuild}")
    metadata = dict(builder.info.metadata or {})
    if not {"hagrid_version", "class_counts"} <= set(metadata):
        raise DataLayoutError(f"{builder.data_dir} has no class counts in its metadata.json; delete it and {rebuild}")
    return Build(metadata["hagrid_version"], metadata["class_counts"])


class TfdsReader:
    """Random access to a built split as pipeline elements (record, JPEG bytes); picklable."""

    decoded_once = True  # the build decoded and resized every image (`sources.Source.decoded_once`)

    def __init__(self, data_dir: str, split: str, class_counts: Mapping[str, int] | None = None):
        self.data_dir, self.split = data_dir, split
        self.class_counts = class_counts  # images per class, per the build's metadata
        self._source = tfds.data_source(NAME, split=split, data_dir=data_dir,
                                        decoders={"image": tfds.decode.SkipDecoding()})

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[hagrid.HagridRecord, bytes]:
        example = self._source[index]
        return hagrid.HagridRecord.from_json_dict(json.loads(example["record"])), example["image"]

