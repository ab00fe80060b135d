"""Serving artifacts: the whole inference function serialised with `jax.export` (and ONNX).

    python -m solov2_jax.export --config C --weights W --out DIR [--onnx]
        [--platforms=cpu,cuda] [--max-side=N]

What is exported is `predict.infer_fn` with the weights baked in as constants: one
preprocessed batch -> model -> point NMS -> Matrix NMS -> masks at the original size,
tight boxes, labels, scores, valid. One artifact per input bucket (landscape w >= h and
portrait: the static shapes `data.transforms.bucket_shapes` gives for the test scale), each
with a **symbolic batch** dimension `b` and lowered for every platform in `--platforms`
(default cpu and cuda; a CPU machine exports both). Inputs, per bucket (H, W):

    image      [b, H, W, 3] float32   `data.preprocess.eval_example`'s image (RGB,
                                      normalised, zero padded)
    img_shape  [b, 2] int32           size after the keep-ratio resize
    ori_shape  [b, 2] int32           original size; each <= out_hw
    canvas     [b, 2] int32           the image's own x32 padded size (mmdet's canvas)

Outputs (K = test.max_per_img, (Ho, Wo) = the bucket's static `out_hw`, which bounds the
original image size: `--max-side`, default the test scale's long side, square):
masks [b, K, Ho, Wo] bool (image at [:ori_h, :ori_w]), boxes [b, K, 4] float32 xyxy,
labels [b, K] int32 (-1 empty), scores [b, K] float32, valid [b, K] bool.

DIR gets `<bucket>.jax` (serialised `jax.export.Exported`), with `--onnx` also
`<bucket>.onnx` (jax2onnx, the `[export]` extra), and `model.json` describing inputs,
outputs, buckets, preprocessing, thresholds, classes, and the JAX version and calling
convention that produced it. `load_exported(DIR)` runs the artifacts on images (host
preprocessing = `data.preprocess`, as everywhere else).

Compatibility: a serialised export can be run by the JAX/jaxlib that wrote it and by
later releases for at least 6 months (JAX's backward-compatibility guarantee for
`jax.export`); an older jaxlib can run it only if it supports the recorded
`calling_convention_version`. Re-export after upgrading JAX beyond that window.
Symbolic height/width is not offered: `lax.top_k` over a shape-dependent number of cells
does not export. The jax2tf -> TF SavedModel route fails at run time (TF cannot read the
StableHLO composite `lax.top_k` lowers to) and is not provided.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from solov2_jax.cli import UserError
from solov2_jax.data import preprocess

FORMAT = "solov2-jax-export"
FORMAT_VERSION = 1
INPUTS = ("image", "img_shape", "ori_shape", "canvas")
OUTPUTS = ("boxes", "labels", "masks", "scores", "valid")  # sorted: the flattening order


class ExportError(UserError):
    """A user-facing export/load problem (missing artifact, bad directory, image too big)."""


def bucket_specs(config, max_side: int | None = None) -> list[dict]:
    """[{'name', 'input_hw', 'out_hw'}] for the landscape and portrait buckets."""
    from solov2_jax.data.transforms import bucket_shapes

    scale = tuple(int(v) for v in config.data.test_scale)
    shapes = bucket_shapes([scale], int(config.data.pad_size_divisor))
    side = int(max_side or max(scale))
    return [{"name": name, "input_hw": [int(v) for v in shapes[k]], "out_hw": [side, side]}
            for k, name in enumerate(("landscape", "portrait"))]


def _input_specs(input_hw, batch):
    return [jax.ShapeDtypeStruct((batch, *input_hw, 3), jnp.float32)] + [
        jax.ShapeDtypeStruct((batch, 2), jnp.int32)] * 3


def _bound_infer(config, variables, out_hw):
    from solov2_jax.predict import infer_fn

    infer = infer_fn(config.model, config.test, out_hw)
    variables = jax.tree.map(np.asarray, variables)

    def fn(image, img_shape, ori_shape, canvas):
        return infer(variables, image, img_shape, ori_shape, canvas)

    return fn


def export_jax(config, variables, input_hw, out_hw,
               platforms: Sequence[str] = ("cpu", "cuda")) -> jax.export.Exported:
    """`jax.export` of `infer(variables, image, img_shape, ori_shape, canvas)` for one
    bucket, symbolic batch `b`. The variables are an argument, not constants: XLA then
    compiles the same arithmetic as in-process inference (with constant weights it folds
    e.g. BatchNorm into them, which moved a few mask pixels at the threshold)."""
    from solov2_jax.predict import infer_fn

    (b,) = jax.export.symbolic_shape("b")
    fn = jax.jit(infer_fn(config.model, config.test, out_hw))
    var_specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                             variables)
    return jax.export.export(fn, platforms=tuple(platforms))(
        var_specs, *_input_specs(input_hw, b))


def save_weights(path: str, variables) -> None:
    """Variables as one .npz, keys '/'-joined paths ('params/backbone/conv1/kernel')."""
    from flax import traverse_util

    from solov2_jax.checkpoint import atomic_write

    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(variables)), sep="/")
    buf = io.BytesIO()
    np.savez(buf, **flat)
    atomic_write(path, buf.getvalue())


def load_weights(path: str) -> dict:
    from flax import traverse_util

    with np.load(path) as data:
        return traverse_util.unflatten_dict({k: data[k] for k in data.files}, sep="/")


def _patch_jax2onnx_rem():
    """jax2onnx's `lax.rem` lowering stamps shapes with `int(dim)`, which a symbolic
    batch cannot give; ONNX shapes take a name for a symbolic dimension instead."""
    import onnx_ir
    from jax2onnx.plugins.jax.lax import rem

    if getattr(rem.ir, "_solov2_patched", False):
        return

    class _IR:
        _solov2_patched = True

        def __getattr__(self, name):
            return getattr(onnx_ir, name)

        @staticmethod
        def Shape(dims, *args, **kwargs):  # noqa: N802 - onnx_ir's name
            return onnx_ir.Shape([str(d) if jax.export.is_symbolic_dim(d) else d
                                  for d in dims], *args, **kwargs)

    rem.ir = _IR()


@contextlib.contextmanager
def _onnx_safe_model():
    """jax2onnx 0.13 mis-lowers a row gather under vmap with a symbolic batch (the
    canvas coordinates' `linspace_table(size)[n - 1]`): it reshapes the [b, 1, 2] gather
    indices to [2b, 1] while declaring [b, 1], and ONNX Runtime stops with "Shape
    mismatch attempting to re-use buffer". For the ONNX trace only, the row is selected
    with a one-hot sum instead (the same values: one table entry plus zeros)."""
    from solov2_jax import ops
    from solov2_jax.models import canvas

    original = canvas._linspace

    def one_hot_linspace(n, size, dtype):
        table = jnp.asarray(ops.linspace_table(size))
        pick = jnp.arange(size) == jnp.clip(n, 1, size) - 1
        return jnp.where(pick[:, None], table, 0.0).sum(axis=0).astype(dtype)

    canvas._linspace = one_hot_linspace
    try:
        yield
    finally:
        canvas._linspace = original


def export_onnx(config, variables, input_hw, out_hw, path: str) -> str:
    """ONNX (jax2onnx, opset 23) of the bound inference function, symbolic batch 'b'."""
    try:
        from jax.interpreters import batching

        if not hasattr(batching, "not_mapped"):  # removed in JAX 0.9; older jax2onnx reads it
            batching.not_mapped = None
        import jax2onnx
        import onnx
    except ImportError as e:
        raise ExportError(f"ONNX export needs the [export] extra (pip install "
                          f"'solov2-jax[export]'): {e}") from None
    _patch_jax2onnx_rem()
    (b,) = jax.export.symbolic_shape("b")
    # jax2onnx traces with patched primitives: keep those traces out of the jit caches
    # that in-process inference uses (and ours out of its trace).
    jax.clear_caches()
    try:
        with _onnx_safe_model():
            model = jax2onnx.to_onnx(_bound_infer(config, variables, out_hw),
                                     _input_specs(input_hw, b), model_name="solov2",
                                     input_names=list(INPUTS), output_names=list(OUTPUTS))
    finally:
        jax.clear_caches()
    onnx.save(model, path)
    return path


def export(config, variables, out_dir: str, *, platforms: Sequence[str] = ("cpu", "cuda"),
           onnx: bool = False, max_side: int | None = None, source: dict | None = None,
           onnx_buckets: Sequence[str] | None = None) -> dict:
    """Writes every bucket's artifacts and model.json into out_dir; returns the metadata.

    onnx_buckets: with onnx=True, the buckets converted to ONNX (default all)."""
    from solov2_jax.checkpoint import atomic_write, atomic_write_json
    from solov2_jax.predict import class_info

    os.makedirs(out_dir, exist_ok=True)
    buckets = bucket_specs(config, max_side)
    save_weights(os.path.join(out_dir, "weights.npz"), variables)
    exported = None
    for bucket in buckets:
        exported = export_jax(config, variables, bucket["input_hw"], bucket["out_hw"],
                              platforms)
        bucket["jax"] = f"{bucket['name']}.jax"
        atomic_write(os.path.join(out_dir, bucket["jax"]), bytes(exported.serialize()))
        if onnx and (onnx_buckets is None or bucket["name"] in onnx_buckets):
            bucket["onnx"] = f"{bucket['name']}.onnx"
            export_onnx(config, variables, bucket["input_hw"], bucket["out_hw"],
                        os.path.join(out_dir, bucket["onnx"]))
    k = int(config.test.max_per_img)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "jax_version": jax.__version__,
        "calling_convention_version": exported.calling_convention_version,
        "platforms": list(platforms),
        "inputs": [
            {"name": "image", "shape": ["b", "H", "W", 3], "dtype": "float32"},
            {"name": "img_shape", "shape": ["b", 2], "dtype": "int32"},
            {"name": "ori_shape", "shape": ["b", 2], "dtype": "int32"},
            {"name": "canvas", "shape": ["b", 2], "dtype": "int32"}],
        "outputs": [
            {"name": "boxes", "shape": ["b", k, 4], "dtype": "float32", "format": "xyxy"},
            {"name": "labels", "shape": ["b", k], "dtype": "int32"},
            {"name": "masks", "shape": ["b", k, "Ho", "Wo"], "dtype": "bool"},
            {"name": "scores", "shape": ["b", k], "dtype": "float32"},
            {"name": "valid", "shape": ["b", k], "dtype": "bool"}],
        "buckets": buckets,
        "preprocess": {"test_scale": [int(v) for v in config.data.test_scale],
                       "mean": [float(v) for v in config.data.mean],
                       "std": [float(v) for v in config.data.std],
                       "pad_size_divisor": int(config.data.pad_size_divisor),
                       "portrait": "width < height"},
        "test_cfg": config.test.to_dict(),
        "classes": class_info(config),
        "source": source or {},
    }
    atomic_write_json(os.path.join(out_dir, "model.json"), meta, indent=1)
    return meta


class ExportedModel:
    """Artifacts of `export` loaded for inference; `__call__(images)` -> Predictions.

    runtime 'jax' runs the `jax.export` artifacts (on the default backend's platform),
    'onnx' the ONNX files in ONNX Runtime. Images are paths or numpy HWC uint8 (RGB, or
    BGR with bgr=True), preprocessed with `data.preprocess` exactly as `Predictor` does.
    """

    def __init__(self, directory: str, runtime: str = "jax"):
        self.directory = os.path.abspath(directory)
        path = os.path.join(self.directory, "model.json")
        try:
            with open(path) as f:
                self.meta = json.load(f)
        except FileNotFoundError:
            raise ExportError(f"{path}: not found (not an export directory)") from None
        except json.JSONDecodeError as e:
            raise ExportError(f"{path}: not valid JSON ({e})") from None
        if self.meta.get("format") != FORMAT or self.meta.get("format_version") != FORMAT_VERSION:
            raise ExportError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} description")
        if runtime not in ("jax", "onnx"):
            raise ExportError(f"unknown runtime {runtime!r} (jax or onnx)")
        self.runtime = runtime
        self.buckets = self.meta["buckets"]
        self.classes = self.meta["classes"]
        self._run = {}  # bucket name -> runner, loaded on first use
        self._variables = None  # weights.npz, for the jax runtime

    def _runner(self, name: str):
        if name not in self._run:
            bucket = next(b for b in self.buckets if b["name"] == name)
            load = self._load_jax if self.runtime == "jax" else self._load_onnx
            self._run[name] = load(bucket)
        return self._run[name]

    def _artifact(self, bucket, key):
        if key not in bucket:
            raise ExportError(f"{self.directory} has no {key} artifact for bucket "
                              f"{bucket['name']} (export with --onnx for ONNX)")
        path = os.path.join(self.directory, bucket[key])
        if not os.path.isfile(path):
            raise ExportError(f"{path}: not found")
        return path

    def _load_jax(self, bucket):
        with open(self._artifact(bucket, "jax"), "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
        if self._variables is None:
            path = os.path.join(self.directory, "weights.npz")
            if not os.path.isfile(path):
                raise ExportError(f"{path}: not found")
            self._variables = jax.device_put(load_weights(path))
        variables = self._variables

        def run(*args):
            return {k: np.asarray(v) for k, v in exported.call(variables, *args).items()}

        return run

    def _load_onnx(self, bucket):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ExportError(f"running ONNX needs onnxruntime (the [export] extra): {e}"
                              ) from None
        session = ort.InferenceSession(self._artifact(bucket, "onnx"),
                                       providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]

        def run(*args):
            outs = session.run(None, dict(zip(INPUTS, args, strict=True)))
            return dict(zip(names, outs, strict=True))

        return run

    def preprocess(self, img_bgr: np.ndarray, name: str = "<image>") -> tuple[str, dict]:
        """(bucket name, `preprocess.eval_example`) of one BGR uint8 image."""
        p = self.meta["preprocess"]
        h, w = img_bgr.shape[:2]
        bucket = self.buckets[1] if w < h else self.buckets[0]
        if h > bucket["out_hw"][0] or w > bucket["out_hw"][1]:
            raise preprocess.ImageError(
                f"{name}: {h}x{w} is larger than the exported output canvas "
                f"{bucket['out_hw'][0]}x{bucket['out_hw'][1]} (export with a larger "
                "--max-side)")
        return bucket["name"], preprocess.eval_example(
            img_bgr, scale=p["test_scale"], mean=p["mean"], std=p["std"],
            input_hw=bucket["input_hw"], divisor=p["pad_size_divisor"])

    def run(self, bucket: str, batch: dict) -> dict:
        """Raw outputs (numpy) of one bucket's artifact on a [b, ...] batch."""
        return self._runner(bucket)(*(np.asarray(batch[k]) for k in INPUTS))

    def predict(self, images, *, bgr: bool = False, batch_size: int = 8):
        """Images -> `predict.Prediction` per image (batches of <= batch_size per bucket)."""
        from solov2_jax.predict import Prediction, load_images

        items = [(src, *self.preprocess(img, src)) for src, img in load_images(images, bgr)]
        results = [None] * len(items)
        for bucket in self.buckets:
            idx = [i for i, it in enumerate(items) if it[1] == bucket["name"]]
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                batch = {k: np.stack([items[i][2][k] for i in chunk]) for k in INPUTS}
                out = self.run(bucket["name"], batch)
                for row, i in enumerate(chunk):
                    h, w = (int(v) for v in batch["ori_shape"][row])
                    ks = np.flatnonzero(out["valid"][row])
                    labels = out["labels"][row, ks].astype(np.int64)
                    results[i] = Prediction(
                        masks=np.asarray(out["masks"][row, ks, :h, :w], bool),
                        boxes=np.asarray(out["boxes"][row, ks], np.float32),
                        labels=labels, scores=np.asarray(out["scores"][row, ks], np.float32),
                        class_names=[self.classes[int(v)]["name"] for v in labels],
                        category_ids=[self.classes[int(v)]["id"] for v in labels],
                        source=items[i][0])
        return results

    __call__ = predict


def load_exported(directory: str, runtime: str = "jax") -> ExportedModel:
    """Loads `export`'s DIR for inference (runtime 'jax' or 'onnx')."""
    return ExportedModel(directory, runtime)


def _define_flags(fv, argv):
    from absl import flags

    from solov2_jax import cli

    cli.define_config_flag(fv, argv)  # packaged name or path
    flags.DEFINE_string("weights", None, "converted weights, final_variables, a step "
                        "directory or a training workdir", flag_values=fv)
    flags.DEFINE_string("out", None, "output directory", flag_values=fv)
    flags.DEFINE_list("platforms", ["cpu", "cuda"], "jax.export lowering platforms",
                      flag_values=fv)
    flags.DEFINE_bool("onnx", False, "also write ONNX files (needs the [export] extra)",
                      flag_values=fv)
    flags.DEFINE_integer("max_side", None, "largest original image side the artifacts "
                         "accept (the static output canvas); default the test scale's "
                         "long side", flag_values=fv)


def _execute(fv) -> dict:
    from ml_collections import config_flags

    from solov2_jax.predict import load_weights

    if fv.config is None:
        raise ExportError("--config is required")
    if not fv.weights:
        raise ExportError("--weights DIR is required")
    if not fv.out:
        raise ExportError("--out DIR is required")
    name = config_flags.get_config_filename(fv["config"])
    variables = load_weights(fv.config, fv.weights, name)
    meta = export(fv.config, variables, fv.out, platforms=fv.platforms, onnx=fv.onnx,
                  max_side=fv.max_side,
                  source={"config": name, "weights": os.path.abspath(fv.weights)})
    files = [b[k] for b in meta["buckets"] for k in ("jax", "onnx") if k in b]
    print(f"solov2-export: {', '.join(files)} + model.json -> {os.path.abspath(fv.out)}")
    return meta


def main(argv: list[str]) -> int:
    """CLI (callable in-process); returns the exit status."""
    from solov2_jax import cli

    def execute(fv, inputs):
        _execute(fv)
        return 0

    return cli.absl_main("solov2-export", __doc__, _define_flags, execute, argv)


def run() -> None:
    """Console-script entry point (`solov2-export`)."""
    from solov2_jax import cli

    cli.console_entry(main)


if __name__ == "__main__":
    run()
