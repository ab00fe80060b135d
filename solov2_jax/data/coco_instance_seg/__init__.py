"""COCO-format parsing for the `coco_instance_seg` TFDS builder (see `data.coco_builder`)."""
