"""Bad input: each case gets a clear error naming the file/record, or a logged, counted skip."""
from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.data import (AnnotationError, CocoDetection, DataConfig, DetectionTransform, EmptyDatasetError,
                           EncodedImage, TooManyBadImagesError, build_dataset, build_index, collate, read_image)

TF = DetectionTransform(48, 96, 0.0)  # keep the original size: 48x64 images


def make_coco(root, boxes_per_image, *, categories=None, size=(48, 64)):
    """A COCO root: one 48x64 JPEG per entry of ``boxes_per_image`` (list of (bbox, cat, crowd))."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, boxes in enumerate(boxes_per_image):
        name = f"{i:04d}.jpg"
        Image.new("RGB", size[::-1], (10 * i % 255, 80, 160)).save(root / "images" / name)
        images.append({"id": 100 + i, "file_name": name, "height": size[0], "width": size[1]})
        for bbox, cat, crowd in boxes:
            anns.append({"id": 1000 + len(anns), "image_id": 100 + i, "category_id": cat, "bbox": bbox,
                         "area": bbox[2] * bbox[3], "iscrowd": crowd})
    data = {"images": images, "annotations": anns,
            "categories": categories or [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, root / "images"


OK_BOX = ([5, 5, 20, 10], 3, 0)


# -- annotation files ---------------------------------------------------------------------------
def test_missing_annotation_file(tmp_path):
    (tmp_path / "img").mkdir()
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        CocoDetection(tmp_path / "nothere.json", tmp_path / "img", train=True)


def test_unreadable_annotation_file(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(AnnotationError, match="dir.json.*directory"):
        CocoDetection(tmp_path / "dir.json", tmp_path / "img", train=True)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(AnnotationError, match="bin.json.*not valid JSON"):
        CocoDetection(tmp_path / "bin.json", tmp_path / "img", train=True)
    (tmp_path / "cut.json").write_text('{"images": [{"id": 1,')
    with pytest.raises(AnnotationError, match="cut.json.*not valid JSON.*line 1"):
        CocoDetection(tmp_path / "cut.json", tmp_path / "img", train=True)


@pytest.mark.parametrize("content, match", [
    ([1, 2, 3], "not a COCO annotation file: top level is a list"),
    ({"annotations": []}, r"missing key\(s\) \['images', 'categories'\]"),
    ({"images": {}, "categories": []}, "'images' must be a list"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1}]}, r"image record #0 \(id 1\)"),
    ({"images": [{"id": 1, "file_name": "a.jpg", "height": 0, "width": 5}], "categories": [{"id": 1}]},
     "image id 1 has non-positive size"),
    ({"images": [{"id": 1, "file_name": "a.jpg", "height": 5, "width": 5}], "categories": [{"id": 1}],
      "annotations": [{"id": 9, "image_id": 1, "category_id": 1}]}, r"annotation #0 \(id 9\) is malformed"),
    ({"images": [{"id": 1, "file_name": "a.jpg", "height": 5, "width": 5}], "categories": [{"id": 1}],
      "annotations": [{"id": 9, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}]}, r"id 9"),
    ({"images": [{"id": 1, "file_name": "a.jpg", "height": 5, "width": 5}], "categories": [{"id": 1}],
      "annotations": [{"id": 9, "image_id": 2, "category_id": 1, "bbox": [1, 2, 3, 3]}]},
     "annotation id 9 refers to image_id 2"),
    ({"images": [{"id": 1, "file_name": "a.jpg", "height": 5, "width": 5}], "categories": []}, "no 'categories'"),
])
def test_json_that_is_not_coco(tmp_path, content, match):
    (tmp_path / "img").mkdir()
    f = tmp_path / "weird.json"
    f.write_text(json.dumps(content))
    with pytest.raises(AnnotationError, match=match) as e:
        CocoDetection(f, tmp_path / "img", train=False)
    assert "weird.json" in str(e.value)


def test_unknown_category_id_names_annotation_and_file(tmp_path):
    ann, img = make_coco(tmp_path, [[OK_BOX, ([1, 1, 5, 5], 42, 0)]])
    with pytest.raises(AnnotationError, match=r"ann.json: annotation id 1001 has unknown category_id 42"):
        CocoDetection(ann, img, train=True)
    with pytest.raises(AnnotationError, match="annotation id 1001"):
        build_index(ann, tmp_path / "x.parquet")


def test_missing_image_directory(tmp_path):
    ann, _ = make_coco(tmp_path, [[OK_BOX]])
    with pytest.raises(FileNotFoundError, match="image directory not found.*nope"):
        CocoDetection(ann, tmp_path / "nope", train=True)


def test_not_an_index_parquet(tmp_path):
    (tmp_path / "img").mkdir()
    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "plain.parquet")
    with pytest.raises(AnnotationError, match="plain.parquet.*not an atss-ray annotation index"):
        CocoDetection(tmp_path / "plain.parquet", tmp_path / "img", train=True)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(AnnotationError, match="junk.parquet"):
        CocoDetection(tmp_path / "junk.parquet", tmp_path / "img", train=True)
    with pytest.raises(FileNotFoundError, match="gone.parquet"):
        CocoDetection(tmp_path / "gone.parquet", tmp_path / "img", train=True)


# -- boxes --------------------------------------------------------------------------------------
def test_boxes_outside_the_image_are_clipped(tmp_path):
    ann, img = make_coco(tmp_path, [[([-10, -4, 30, 20], 3, 0), ([50, 40, 30, 30], 7, 0)]])
    ds = CocoDetection(ann, img, train=True, transform=TF)
    _, t = ds[0]
    assert t["boxes"].tolist() == [[0, 0, 20, 16], [50, 40, 64, 48]]
    assert t["labels"].tolist() == [1, 2]


def test_degenerate_boxes_are_dropped_with_a_log(tmp_path, caplog):
    boxes = [OK_BOX, ([5, 5, 0, 10], 3, 0), ([5, 5, 10, -2], 3, 0), ([5, 5, 0.5, 10], 7, 0),
             ([70, 5, 10, 10], 3, 0), ([10, 10, 1, 1], 7, 0)]
    ann, img = make_coco(tmp_path, [boxes])
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        ds = CocoDetection(ann, img, train=True, transform=TF)
    assert "dropped 4 box(es)" in caplog.text and "ann.json" in caplog.text and "1001" in caplog.text
    _, t = ds[0]
    # Kept: the normal box and the 1x1 px one (the rule drops boxes *under* 1 px).
    assert t["boxes"].tolist() == [[5, 5, 25, 15], [10, 10, 11, 11]]


def test_crowd_boxes_are_kept_apart(tmp_path):
    ann, img = make_coco(tmp_path, [[OK_BOX, ([30, 20, 20, 20], 7, 1)], [([1, 1, 9, 9], 7, 1)]])
    train = CocoDetection(ann, img, train=True, transform=TF)
    assert len(train) == 1  # the crowd-only image has no positive: left out of training
    _, t = train[0]
    assert t["labels"].tolist() == [1] and t["crowd_boxes"].tolist() == [[30, 20, 50, 40]]
    evaluation = CocoDetection(ann, img, train=False, transform=TF)
    assert len(evaluation) == 2 and evaluation[1][1]["boxes"].shape == (0, 4)


def test_empty_dataset_after_filtering(tmp_path):
    ann, img = make_coco(tmp_path, [[([5, 5, 0, 0], 3, 0)], [([1, 1, 9, 9], 7, 1)]])
    with pytest.raises(EmptyDatasetError, match=r"ann.json: dataset is empty after filtering.*2 images"):
        CocoDetection(ann, img, train=True)
    assert len(CocoDetection(ann, img, train=False)) == 2  # evaluation keeps every image
    empty = tmp_path / "none.json"
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    with pytest.raises(EmptyDatasetError, match="none.json.*lists no images"):
        CocoDetection(empty, img, train=False)


# -- images -------------------------------------------------------------------------------------
def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path, caplog):
    ann, img = make_coco(tmp_path, [[OK_BOX]] * 12)
    (img / "0003.jpg").write_bytes((img / "0003.jpg").read_bytes()[:100])  # truncated JPEG
    ds = CocoDetection(ann, img, train=True, transform=TF, max_bad_fraction=0.2)
    with caplog.at_level(logging.WARNING):
        _, t = ds[3]
    assert t["image_id"] == 104 and ds.num_bad_images == 1 and ds.bad_files[0].endswith("0003.jpg")
    assert "0003.jpg" in caplog.text
    (img / "0007.jpg").unlink()
    _, t = ds[7]
    assert t["image_id"] == 108 and ds.num_bad_images == 2
    # Every sample of an epoch still comes back; only the bad ones are replaced.
    ids = [ds[i][1]["image_id"] for i in range(len(ds))]
    assert 103 not in ids and 107 not in ids and len(ids) == 12
    (img / "0009.jpg").write_bytes(b"")
    with pytest.raises(TooManyBadImagesError, match="3 of 12 images.*0003.jpg.*0007.jpg.*0009.jpg"):
        ds[9]


def test_image_whose_size_disagrees_with_the_annotation_is_skipped(tmp_path):
    ann, img = make_coco(tmp_path, [[OK_BOX]] * 3)
    Image.new("RGB", (30, 30)).save(img / "0001.jpg")
    ds = CocoDetection(ann, img, train=False, transform=TF, max_bad_fraction=0.5)
    assert ds[1][1]["image_id"] == 102 and "0001.jpg" in ds.bad_files[0]


def test_grayscale_and_png_images_are_fine(tmp_path):
    ann, img = make_coco(tmp_path, [[OK_BOX]])
    Image.new("L", (64, 48), 128).save(img / "0000.jpg", format="PNG")  # wrong extension, grey
    image, t = CocoDetection(ann, img, train=True, transform=TF)[0]
    assert image.shape == (3, 48, 64) and torch.allclose(image[0], image[0, 0, 0].expand(48, 64))


def test_gpu_decode_takes_jpegs_as_bytes_and_decodes_other_files_here(tmp_path):
    ann, img = make_coco(tmp_path, [[OK_BOX]] * 4)
    Image.new("L", (64, 48), 128).save(img / "0001.jpg", format="PNG")  # PNG under a .jpg name
    Image.new("CMYK", (64, 48), (0, 50, 100, 0)).save(img / "0002.jpg", format="JPEG")  # not for nvJPEG
    Image.new("L", (64, 48), 90).save(img / "0003.jpg", format="JPEG")  # grey JPEG: nvJPEG takes it
    tf = DetectionTransform(24, 96, 0.5)
    host = CocoDetection(ann, img, train=True, transform=tf)
    deferred = CocoDetection(ann, img, train=True, transform=tf, gpu_decode=True)
    samples = [deferred[(i, 1)] for i in range(4)]
    assert all(isinstance(s, EncodedImage) for s, _ in samples)
    assert [s.data is not None for s, _ in samples] == [True, False, False, True]
    want, _ = collate([host[(i, 1)] for i in range(4)])
    assert torch.equal(collate(samples)[0].to("cpu"), want)


def test_gpu_decode_checks_the_header_size_and_needs_a_detection_transform(tmp_path):
    ann, img = make_coco(tmp_path, [[OK_BOX]] * 3)
    Image.new("RGB", (30, 30)).save(img / "0001.jpg")
    ds = CocoDetection(ann, img, train=False, transform=TF, max_bad_fraction=0.5, gpu_decode=True)
    assert ds[1][1]["image_id"] == 102 and "0001.jpg" in ds.bad_files[0]
    with pytest.raises(ValueError, match="gpu_decode=True needs a DetectionTransform"):
        CocoDetection(ann, img, train=False, transform=lambda im, t, rng: (im, t), gpu_decode=True)


def test_read_image_decodes_jpeg_like_pil(tmp_path):
    import numpy as np

    arr = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=85)
    with Image.open(tmp_path / "a.jpg") as im:
        want = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(read_image(tmp_path / "a.jpg"), want)
    with pytest.raises(FileNotFoundError, match="image file not found: .*b.jpg"):
        read_image(tmp_path / "b.jpg")


# -- config ---------------------------------------------------------------------------------------
def test_files_source_needs_both_paths(tmp_path):
    ann, img = make_coco(tmp_path, [[OK_BOX]])
    with pytest.raises(ValueError, match="val_ann and val_images"):
        build_dataset(DataConfig(source="files", train_ann=str(ann), train_images=str(img)), "val", False)
    with pytest.raises(FileNotFoundError, match="COCO root not found.*nowhere"):
        build_dataset(DataConfig(source=f"coco:{tmp_path / 'nowhere'}"), "train", True)
