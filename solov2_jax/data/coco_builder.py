"""TFDS builder for a local COCO-format instance-segmentation directory, plus its read API.

Layout read: `<coco_dir>/annotations/instances_<X>.json` with images in `<coco_dir>/<X>/`.
Every such pair is one split; `X` ending in "2017" is exposed without it (`train2017` ->
'train', `val2017` -> 'val'), any other stem as is (`instances_minival.json` -> 'minival').
Nothing is ever downloaded: the directory is the TFDS manual dir and GCS is disabled.

Storage choices (why):
* the image is stored as the file's original bytes (no re-encode: no quality loss, no
  extra CPU, and the bytes stay comparable with the source file);
* each instance mask is its own 8-bit PNG of 0/1 values at the original image size.
  Deflate shrinks binary masks to ~1-3% of H*W, and `tf.io.decode_png` runs in-graph and
  in parallel inside tf.data. COCO RLE would be smaller still, but decoding it needs
  pycocotools through `tf.numpy_function`, which holds the GIL and serialises the input
  pipeline. Rasterising once at prepare time also fixes the mask semantics (pycocotools
  `frPyObjects`/`merge`/`decode`, exactly what mmdet's `LoadAnnotations` does).

Every JSON is validated (`validate_coco_dir`) before TensorFlow is imported or anything
is written. AnnotationError is a ValueError and a `cli.UserError` (one `error:` line).

Broken input: errors for things that indicate a wrong/inconsistent annotation file
(fix the file), skips (counted in the summary, with examples) for per-item damage that
mmdet itself drops or that cannot be trained on:

  case                                           | action
  -----------------------------------------------|---------------------------------------
  annotation -> unknown image id / category id   | ValueError naming the annotation id
  duplicate image or annotation id               | ValueError naming the id
  segmentation not polygon/RLE, RLE size != image| ValueError naming the annotation id
  category lists that disagree between splits    | ValueError naming the file
  JSON that does not parse / empty images list   | AnnotationError naming the file
  bbox not 4 finite numbers, non-finite area     | AnnotationError naming the annotation id
  polygon coordinate not a finite number, or     | AnnotationError naming the annotation id
  more than one image size outside the image     | (checked before pycocotools sees it)
  RLE counts malformed or not covering h*w       | AnnotationError naming the annotation id
  image file missing                             | skip image: `missing_image_file`
  image file unreadable/truncated/unsupported    | skip image: `unreadable_image`
  image file size != JSON width/height           | skip image: `image_size_mismatch`
  box w<1 or h<1 or area<=0 (mmdet rule)         | skip instance: `degenerate_box`
  box not intersecting the image (mmdet rule)    | skip instance: `box_outside_image`
  polygon part with <3 points or odd length      | part dropped (mmdet rule): counted as
                                                 | `polygon_parts_dropped`, instance kept
  polygon with no valid part left                | skip instance: `invalid_polygon`
  annotations of a skipped image                 | counted: `annotations_of_skipped_images`
  image without annotations                      | kept with N=0
  crowd (iscrowd=1, any mask format)             | kept, `is_crowd=True`

Raw example (`read_split(..., decode=False)`, what `decode_example` takes): `image` (the
file's encoded bytes), `image_id` int64, `file_name` string, `height`/`width` int32
(from the JSON, checked against the file), `num_annotations` int32 (annotations of the
image in the JSON before any skip), and `objects` with per-instance `bbox` float32 [N, 4]
(COCO xywh), `label` int64 (contiguous), `category_id` int64, `is_crowd` bool, `area`
float32, `id` int64 (annotation id) and `mask` (PNG bytes) [N]. Instances are sorted by
annotation id.

mmdet keeps an all-invalid polygon as an *ignored* instance, which never reaches the
SOLOv2 targets; skipping it is therefore equivalent for training.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np

from solov2_jax.cli import UserError

_BUILDER_NAME = "coco_instance_seg"
_VERSION = "1.0.0"
_MAX_EXAMPLES = 5  # example ids / file names kept per skip reason

# Imported lazily: keeps `import solov2_jax.data` free of TensorFlow.
_builder_cls = None


class DataError(UserError, ValueError):
    """A COCO directory or annotation file that must be fixed (one-line CLI error)."""


def split_name(stem: str) -> str:
    """TFDS split name for an annotation stem: 'train2017' -> 'train', 'minival' as is."""
    name = stem[:-4] if stem.endswith("2017") and len(stem) > 4 else stem
    if not re.fullmatch(r"[\w-]+", name):
        raise DataError(f"annotation file instances_{stem}.json gives an invalid split name")
    return name


def discover_splits(coco_dir: str | os.PathLike) -> dict[str, str]:
    """Maps TFDS split name -> stem for every `annotations/instances_<stem>.json`."""
    ann_dir = Path(coco_dir) / "annotations"
    files = sorted(ann_dir.glob("instances_*.json"))
    if not files:
        raise FileNotFoundError(f"no annotations/instances_*.json found in {coco_dir}")
    splits: dict[str, str] = {}
    for f in files:
        stem = f.stem[len("instances_"):]
        name = split_name(stem)
        if name in splits:
            raise DataError(f"instances_{stem}.json and instances_{splits[name]}.json "
                             f"both map to split '{name}'")
        splits[name] = stem
    return splits


def read_categories(coco_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """(id, name) sorted by id, from the smallest instances file (COCO val, not train)."""
    files = sorted((Path(coco_dir) / "annotations").glob("instances_*.json"),
                   key=lambda p: p.stat().st_size)
    if not files:
        raise FileNotFoundError(f"no annotations/instances_*.json found in {coco_dir}")
    from solov2_jax.data.coco_instance_seg.annotations import load_json

    cats = load_json(files[0]).get("categories") or []
    if not cats:
        raise DataError(f"{files[0]} has no categories")
    return sorted((int(c["id"]), str(c["name"])) for c in cats)


def annotation_fingerprints(coco_dir: str | os.PathLike, previous: dict | None = None
                            ) -> dict[str, dict]:
    """{file name: {'size', 'mtime_ns', 'sha256'}} of every annotations/instances_*.json.

    The hash is reused from `previous` when size and mtime are unchanged (COCO's train
    JSON is 450 MB), so checking a prepared dataset costs a stat per file.
    """
    import hashlib

    out = {}
    for f in sorted((Path(coco_dir) / "annotations").glob("instances_*.json")):
        st = f.stat()
        old = (previous or {}).get(f.name) or {}
        if old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
            digest = old.get("sha256")
        else:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            digest = h.hexdigest()
        out[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return out


def stale_annotations(stored: dict | None, coco_dir: str | os.PathLike) -> list[str]:
    """Names of annotation files whose content differs from what the build was made of."""
    if not stored or not coco_dir or not (Path(coco_dir) / "annotations").is_dir():
        return []
    now = annotation_fingerprints(coco_dir, stored)
    return sorted(n for n in set(now) | set(stored)
                  if (now.get(n) or {}).get("sha256") != (stored.get(n) or {}).get("sha256"))


def config_name(coco_dir: str | os.PathLike | None, name: str | None = None) -> str:
    """BuilderConfig name: `name`, else the sanitised basename of `coco_dir`."""
    if name:
        if not re.fullmatch(r"[a-z0-9_]+", name):
            raise DataError(f"dataset name {name!r} must match [a-z0-9_]+")
        return name
    if not coco_dir:
        raise DataError("need coco_dir or name to identify the dataset")
    base = os.path.basename(os.path.normpath(os.path.abspath(coco_dir)))
    return re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_") or "default"


def _make_builder_cls():
    """Defines the builder class on first use (needs tensorflow_datasets)."""
    global _builder_cls
    if _builder_cls is not None:
        return _builder_cls
    import dataclasses

    import tensorflow_datasets as tfds
    from etils import epath
    from tensorflow_datasets.core.utils import gcs_utils

    from solov2_jax.data.coco_instance_seg import annotations as _coco_ann

    gcs_utils._is_gcs_disabled = True  # never look for a hosted copy

    @dataclasses.dataclass(eq=False)
    class CocoConfig(tfds.core.BuilderConfig):
        coco_dir: str = ""
        categories: tuple = ()  # ((coco id, name), ...) sorted by id

    class CocoInstanceSeg(tfds.core.GeneratorBasedBuilder):
        """Local COCO-format instance segmentation (see module docstring)."""

        VERSION = tfds.core.Version(_VERSION)
        RELEASE_NOTES = {_VERSION: "Original bytes + one 0/1 PNG per instance mask."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            "Pass the COCO-format directory (annotations/instances_<split>.json + "
            "<split>/ images) as manual_dir; see solov2_jax.data.coco_builder.")

        # TFDS derives this via `importlib_resources`, which not every environment has
        # (tfds 4.9.10 imports it lazily); the answer is simply this file.
        code_path = epath.Path(__file__)

        def __init__(self, *args, progress: bool = False, **kwargs):
            self._progress = progress
            self.summary: dict = {}
            super().__init__(*args, **kwargs)

        def _info(self):
            cats = self.builder_config.categories
            f = tfds.features
            return self.dataset_info_from_configs(
                features=f.FeaturesDict({
                    # Any format TF decodes (COCO: JPEG), bytes exactly as in the file.
                    "image": f.Image(shape=(None, None, 3), encoding_format=None),
                    "image_id": np.int64,
                    "file_name": f.Text(),
                    "height": np.int32,
                    "width": np.int32,
                    "num_annotations": np.int32,  # in the JSON, before skips
                    "objects": f.Sequence({
                        "bbox": f.Tensor(shape=(4,), dtype=np.float32),  # COCO xywh
                        "label": f.ClassLabel(names=[n for _, n in cats]),
                        "category_id": np.int64,
                        "is_crowd": np.bool_,
                        "area": np.float32,
                        "id": np.int64,
                        "mask": f.Image(shape=(None, None, 1), encoding_format="png"),
                    }),
                }),
                metadata=tfds.core.MetadataDict(
                    categories=[{"id": i, "name": n, "label": k}
                                for k, (i, n) in enumerate(cats)],
                    coco_dir=self.builder_config.coco_dir,
                ),
            )

        def _split_generators(self, dl_manager):
            root = self.builder_config.coco_dir
            try:  # the manual dir wins when given (download_and_prepare's own way)
                manual = dl_manager.manual_dir
                if (Path(manual) / "annotations").is_dir():
                    root = os.fspath(manual)
            except Exception:  # noqa: BLE001 - no manual dir configured: use the config
                pass
            self.summary = {"splits": {}, "skipped_splits": {}}
            # What this build was made of: a later edit of a JSON is detected on reuse.
            self.info.metadata["annotation_fingerprints"] = annotation_fingerprints(root)
            gens = {}
            for name, stem in discover_splits(root).items():
                if not (Path(root) / stem).is_dir():
                    self.summary["skipped_splits"][name] = f"image dir {stem}/ missing"
                    continue
                gens[name] = self._generate_examples(root, stem, name)
            if not gens:
                raise FileNotFoundError(f"no split of {root} has its image directory: "
                                        f"{self.summary['skipped_splits']}")
            self.info.metadata["summary"] = self.summary
            return gens

        def _generate_examples(self, root, stem, name):
            stats = _coco_ann.SplitStats(_MAX_EXAMPLES)
            self.summary["splits"][name] = stats.as_dict()
            yield from _coco_ann.generate(
                Path(root), stem, self.builder_config.categories, stats,
                progress=self._progress, desc=name)
            self.summary["splits"][name] = stats.as_dict()
            self.info.metadata["summary"] = self.summary

    _builder_cls = (CocoInstanceSeg, CocoConfig)
    return _builder_cls


def get_builder(coco_dir: str | None, data_dir: str, name: str | None = None, *,
                progress: bool = False):
    """Builder of `coco_dir` stored under `data_dir/coco_instance_seg/<name>/<version>`.

    Once prepared, only `data_dir` and the name are needed (categories come from the
    stored metadata, so COCO's 450 MB train JSON is not parsed again).
    """
    if not data_dir:
        raise DataError("data_dir must be set")
    builder_cls, config_cls = _make_builder_cls()
    cname = config_name(coco_dir, name)
    meta = Path(data_dir) / _BUILDER_NAME / cname / _VERSION / "metadata.json"
    if meta.exists() and (meta.parent / "dataset_info.json").exists():
        with open(meta) as f:
            stored = json.load(f)
        cats = tuple((c["id"], c["name"]) for c in stored["categories"])
        root = stored.get("coco_dir", "")
        if coco_dir and os.path.abspath(coco_dir) != root:
            warnings.warn(f"dataset '{cname}' in {data_dir} was prepared from {root}, not "
                          f"{os.path.abspath(coco_dir)}; reusing it (pass name= to keep "
                          "both)", stacklevel=2)
    elif coco_dir:
        cats = tuple(read_categories(coco_dir))
        root = os.path.abspath(coco_dir)
    else:
        raise FileNotFoundError(f"dataset '{cname}' is not prepared in {data_dir} and no "
                                "coco_dir was given")
    config = config_cls(name=cname, version=_VERSION, coco_dir=root, categories=cats,
                        description=f"COCO-format instance segmentation from {root}")
    # TFDS logs a warning for every custom (non-registered) config; ours always are.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        return builder_cls(config=config, data_dir=data_dir, progress=progress)
    finally:
        absl_logger.setLevel(level)


def validate_coco_dir(coco_dir: str | os.PathLike) -> None:
    """Parses and checks every annotations/instances_*.json (see the error table above)
    without TensorFlow: bad data fails in seconds, naming the file and annotation id."""
    from solov2_jax.data.coco_instance_seg import annotations as _coco_ann

    cats = read_categories(coco_dir)
    for stem in discover_splits(coco_dir).values():
        _coco_ann._load_split(Path(coco_dir) / "annotations" / f"instances_{stem}.json", cats)


def prepare(coco_dir: str, data_dir: str, name: str | None = None, *, progress=True):
    """Builds the dataset if needed; returns (builder, summary of what was skipped)."""
    import tensorflow_datasets as tfds

    if coco_dir and not (Path(data_dir) / _BUILDER_NAME / config_name(coco_dir, name) /
                         _VERSION / "dataset_info.json").exists():
        validate_coco_dir(coco_dir)  # all JSONs, before TFDS starts writing anything
    builder = get_builder(coco_dir, data_dir, name, progress=progress)
    already = (builder.data_path / "dataset_info.json").exists()
    if not already:
        # Our own tqdm (with totals) replaces TFDS's per-split bars.
        tfds.disable_progress_bar()
        try:
            from solov2_jax import reporting

            # TFDS prints "Downloading and preparing dataset ..." whatever its log level,
            # for a builder that never downloads.
            with reporting.captured_stdout("TFDS"):
                builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
                    manual_dir=os.path.abspath(coco_dir), try_download_gcs=False))
        finally:
            tfds.enable_progress_bar()
    summary = dict(builder.info.metadata.get("summary") or {})
    if already:
        stale = stale_annotations(builder.info.metadata.get("annotation_fingerprints"),
                                  coco_dir)
        if stale:
            summary["stale_annotations"] = stale
            warnings.warn(
                f"the TFDS build at {builder.data_path} is stale: {', '.join(stale)} changed "
                f"in {os.path.abspath(coco_dir)} since it was prepared; it is reused as it "
                f"is. Delete {builder.data_path} to rebuild from the current files.",
                stacklevel=2)
    summary["already_prepared"] = bool(already)
    summary["data_path"] = os.fspath(builder.data_path)
    return builder, summary


def decode_image(data, height, width):
    """Encoded bytes -> uint8 [height, width, 3] RGB, decoded by OpenCV as mmdet decodes
    (accurate IDCT, EXIF orientation applied; `preprocess.decode`), inside tf.data."""
    import tensorflow as tf

    from solov2_jax.data import preprocess

    image = tf.numpy_function(lambda b: np.ascontiguousarray(preprocess.decode(b)[..., ::-1]),
                              [data], tf.uint8, stateful=False)
    return tf.reshape(image, tf.stack([height, width, 3]))


def decode_example(example):
    """Raw example (encoded image / PNG masks) -> canonical example; pure TF graph."""
    import tensorflow as tf

    obj = example["objects"]
    height = tf.cast(example["height"], tf.int32)
    width = tf.cast(example["width"], tf.int32)
    image = decode_image(example["image"], height, width)
    pngs = obj["mask"]
    n = tf.shape(pngs)[0]

    def decode_masks():
        return tf.map_fn(lambda b: tf.io.decode_png(b, channels=1)[..., 0], pngs,
                         fn_output_signature=tf.TensorSpec([None, None], tf.uint8),
                         parallel_iterations=8)

    # map_fn cannot stack zero elements of unknown shape: build [0, H, W] directly.
    masks = tf.cond(n > 0, decode_masks, lambda: tf.zeros([0, height, width], tf.uint8))
    masks = tf.reshape(masks, [n, height, width])
    xywh = tf.reshape(tf.cast(obj["bbox"], tf.float32), [-1, 4])
    boxes = tf.concat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    return {
        "image": image,
        "image_id": tf.cast(example["image_id"], tf.int64),
        "file_name": example["file_name"],
        "height": height,
        "width": width,
        "boxes": boxes,
        "labels": tf.cast(obj["label"], tf.int32),
        "is_crowd": tf.cast(obj["is_crowd"], tf.bool),
        "area": tf.cast(obj["area"], tf.float32),
        "ann_ids": tf.cast(obj["id"], tf.int64),
        "masks": masks,
    }


def read_split(builder, split: str, *, shuffle_files: bool = False, seed=None,
               decode: bool = True):
    """tf.data of canonical examples (raw ones, encoded bytes, with `decode=False`)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    skip = tfds.decode.SkipDecoding()
    ds = builder.as_dataset(
        split=split, shuffle_files=shuffle_files,
        read_config=tfds.ReadConfig(shuffle_seed=seed),
        decoders={"image": skip, "objects": {"mask": skip}})
    if decode:
        ds = ds.map(decode_example, num_parallel_calls=tf.data.AUTOTUNE)
    return ds


def category_info(builder) -> list[dict]:
    """[{'id': coco category id, 'name': str, 'label': contiguous label}] by label."""
    cats = builder.info.metadata.get("categories")
    if not cats:
        cats = [{"id": i, "name": n, "label": k}
                for k, (i, n) in enumerate(builder.builder_config.categories)]
    return [dict(id=int(c["id"]), name=str(c["name"]), label=int(c["label"])) for c in cats]

