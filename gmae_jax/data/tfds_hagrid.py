"""HaGRID as a TFDS dataset (ArrayRecord files), built and read without TensorFlow.

  tfds build gmae_jax/data/tfds_hagrid.py --manual_dir=/data/hagrid --data_dir=~/tensorflow_datasets

Splits are HaGRID's own (v2: the annotation folders; v1: ann_train_val, or ann_subsample alone,
re-split by user as training splits it, and ann_test). Images are stored pre-resized (shorter side
256) as the prepare stage does, with the record's boxes and labels as JSON, so `tfds_source` feeds
the same grain pipeline.
"""

from collections.abc import Iterator
import dataclasses
import json

from etils import epath
import tensorflow_datasets as tfds

from gmae_jax import schema
from gmae_jax.data import hagrid, hagrid_layout, prepare, record_filters, sources, views
from gmae_jax.data.sources import Source
from gmae_jax.schema import DataConfig

_STORE = schema.StoreView(view="full_frame", image_side=256)


class HagridGmae(tfds.core.GeneratorBasedBuilder):
    """HaGRID v1 or v2 from a manual_dir laid out as distributed (see hagrid_format.md)."""

    VERSION = tfds.core.Version("1.0.0")
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
        )  # fmt: skip

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        root = epath.Path(dl_manager.manual_dir)
        if hagrid_layout.detect_layout(root) == "hagrid_v2":
            recs, _ = hagrid.read_hagrid_v2(root)
            parts = sources.hagrid_splits(recs, "hagrid_v2", hagrid_layout.V2_SPLITS, DataConfig())
        else:  # ann_train_val (or ann_subsample alone) split by person as training splits it, and ann_test
            train_val, _ = hagrid.read_hagrid_v1(root, hagrid_layout.v1_train_val_set(root))
            parts = sources.hagrid_splits(train_val, "hagrid_v1", ("train", "val"), DataConfig())
            if (root / "ann_test").is_dir():
                parts["test"] = hagrid.read_hagrid_v1(root, "ann_test")[0]
        classes = hagrid_layout.HAGRID_V2_CLASSES
        return {s: self._generate_examples(rs) for s, rs in parts.items()
                if any(record_filters.gesture_label(r, classes) is not None for r in rs)}

    def _generate_examples(self, recs: list[hagrid.HagridRecord]) -> Iterator[tuple[str, dict]]:
        for record in recs:
            if record_filters.gesture_label(record, hagrid_layout.HAGRID_V2_CLASSES) is None:
                continue  # an unannotated gesture: never guess a label
            stored, jpeg = prepare.store_image(record, _STORE)
            yield f"{record.class_folder}/{record.image_id}", {
                "image": jpeg,
                "label": record_filters.gesture_name(record),
                "record": json.dumps(dataclasses.asdict(stored)),
            }


class TfdsReader:
    """Random access to a built split as pipeline elements (record, JPEG bytes); picklable."""

    def __init__(self, data_dir: str, split: str):
        self.data_dir, self.split = data_dir, split
        self._source = tfds.data_source("hagrid_gmae", split=split, data_dir=data_dir,
                                        decoders={"image": tfds.decode.SkipDecoding()})

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> tuple[hagrid.HagridRecord, bytes]:
        example = self._source[index]
        return hagrid.HagridRecord.from_json_dict(json.loads(example["record"])), example["image"]


def tfds_source(data_dir: str, split: str, mode: str = "full_frame") -> Source:
    """A built split as a pipeline Source (labels index the v2 class list)."""
    view = views.ViewConfig(mode=mode, class_names=hagrid_layout.HAGRID_V2_CLASSES)
    return Source(TfdsReader(data_dir, split), view)
