"""Tests of the `solov2_jax.data.prepare` command line (build, summary print, reuse)."""

from solov2_jax.data import prepare
from tests.data.test_coco_builder import write_tiny_coco


def test_prepare_cli_reports_skips_and_reuses(tmp_path, capsys):
    coco = tmp_path / "my_coco"
    write_tiny_coco(coco)
    argv = ["--coco-dir", str(coco), "--data-dir", str(tmp_path / "tfds"), "--no-progress"]
    builder, summary = prepare.main(argv)
    out = capsys.readouterr().out
    assert "coco_instance_seg/my_coco prepared at" in out
    assert "split mini: kept 2 images, 4 instances (1 crowd)" in out
    assert "missing_image_file: 1" in out and "e.g. missing.jpg" in out
    assert "invalid_polygon: 1" in out and "e.g. 105" in out
    assert "0=cat_b(id 2), 1=cat_a(id 5)" in out
    assert builder.info.splits["mini"].num_examples == 2
    # Second run: nothing rebuilt, the stored summary is printed again.
    _, again = prepare.main(argv)
    out = capsys.readouterr().out
    assert "reused (already prepared)" in out and "missing_image_file: 1" in out
    assert again["splits"] == summary["splits"]


def test_prepare_cli_defaults_to_demo(tmp_path, capsys):
    builder, summary = prepare.main(["--data-dir", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "coco_instance_seg/demo_coco prepared" in out
    assert (tmp_path / "demo_coco" / "annotations" / "instances_train2017.json").exists()
    assert builder.info.splits["train"].num_examples == 48
    assert summary["splits"]["val"]["images"] == 16
    assert "nothing skipped" in out
