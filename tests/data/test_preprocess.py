"""Host preprocessing = mmcv's decoding and resizing, bit for bit; EXIF orientation as mmdet."""

import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from solov2_jax.data import coco_builder, preprocess

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def _jpeg(rng, h, w, exif_orientation=None) -> bytes:
    img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (7, 7), 0)
    buf = io.BytesIO()
    pil = Image.fromarray(img)
    if exif_orientation is None:
        pil.save(buf, "JPEG", quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        pil.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parity
def test_decode_and_resize_equal_mmcv(mmdet):
    import mmcv

    rng = np.random.default_rng(0)
    for h, w, scale in [(97, 201, (320, 192)), (240, 180, (1333, 800)), (64, 64, (32, 32))]:
        data = _jpeg(rng, h, w)
        ours = preprocess.decode(data, "x.jpg")
        ref = mmcv.imfrombytes(data, flag="color", backend="cv2")
        np.testing.assert_array_equal(ours, ref)
        want, _ = mmcv.imrescale(ref, scale, return_scale=True, interpolation="bilinear",
                                 backend="cv2")
        np.testing.assert_array_equal(preprocess.resized_bgr(ours, scale), want)
        ex = preprocess.eval_example(ours, scale=scale, mean=MEAN, std=STD,
                                     input_hw=(want.shape[0] + 40, want.shape[1] + 40))
        norm = (want[..., ::-1].astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
        np.testing.assert_array_equal(ex["image"][:want.shape[0], :want.shape[1]], norm)
        assert not ex["image"][want.shape[0]:].any() and not ex["image"][:, want.shape[1]:].any()
        np.testing.assert_array_equal(ex["canvas"], -(-np.asarray(want.shape[:2]) // 32) * 32)


def test_unreadable_bytes_name_the_file():
    with pytest.raises(preprocess.ImageError, match="notes.jpg: not a readable image"):
        preprocess.decode(b"this is text, not a JPEG", "notes.jpg")
    with pytest.raises(preprocess.ImageError, match="missing.jpg: cannot read"):
        preprocess.read("/nonexistent/missing.jpg")


def test_exif_rotated_square_image_trains_on_the_pixels_mmdet_sees(tmp_path):
    """A square JPEG with EXIF orientation 6 (rotate 90 degrees): TF's decoder ignores the
    tag, OpenCV (mmdet) applies it. The dataset must give the rotated pixels, matching
    the masks drawn on the displayed image."""
    rng = np.random.default_rng(1)
    data = _jpeg(rng, 96, 96, exif_orientation=6)
    shown = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    raw = cv2.imdecode(np.frombuffer(data, np.uint8),
                       cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert not np.array_equal(shown, raw)  # the tag matters for this image
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "train2017" / "1.jpg").write_bytes(data)
    poly = [10.0, 10.0, 60.0, 10.0, 60.0, 40.0, 10.0, 40.0]
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.jpg", "height": 96, "width": 96}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                         "segmentation": [poly], "area": 1500.0,
                         "bbox": [10.0, 10.0, 50.0, 30.0]}],
        "categories": [{"id": 1, "name": "thing"}]}))
    builder, _ = coco_builder.prepare(str(root), str(tmp_path / "tfds"), progress=False)
    ex = next(coco_builder.read_split(builder, "train").as_numpy_iterator())
    np.testing.assert_array_equal(ex["image"], shown[..., ::-1])  # RGB of cv2's pixels
