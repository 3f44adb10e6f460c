"""Test-dev submission files: validation names the image and field, files round-trip, zip layout."""
from __future__ import annotations

import json
import zipfile

import pytest

from pipeline.submission import (SubmissionError, cap_per_image, check_loadres, submission_filename,
                                 validate_results, validate_submission_file, write_submission)


def _info() -> dict:
    images = [{"id": 101, "width": 640, "height": 480, "file_name": "101.jpg"},
              {"id": 102, "width": 300, "height": 500, "file_name": "102.jpg"}]
    cats = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]
    return {"images": images, "categories": cats}


def _results(info: dict, per_image: int = 3) -> list[dict]:
    out = []
    for img in info["images"]:
        for k in range(per_image):
            out.append({"image_id": img["id"], "category_id": info["categories"][k % 2]["id"],
                        "bbox": [10.0 * k, 5.0, 50.0, img["height"] - 5.0], "score": 0.9 - 0.1 * k})
    return out


def _problems(results, info, **kw) -> str:
    with pytest.raises(SubmissionError) as e:
        validate_results(results, info, **kw)
    return str(e.value)


def test_valid_results_write_zip_and_round_trip(tmp_path):
    info = _info()
    results = _results(info)
    json_path, zip_path = write_submission(results, info, tmp_path, "atss_r50")
    assert json_path.name == "detections_test-dev2017_atss_r50_results.json"
    assert zip_path.name == "detections_test-dev2017_atss_r50_results.zip"
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.namelist() == [json_path.name]
        assert json.loads(zf.read(json_path.name)) == json.loads(json_path.read_text())
    assert check_loadres(json_path, info) == len(results)
    assert validate_submission_file(zip_path, info) == len(results)
    assert validate_submission_file(json_path, info) == len(results)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([json_path.name, zip_path.name])


@pytest.mark.parametrize("corrupt, expected", [
    (lambda r: [d for d in r if d["image_id"] != 102],
     r"image 102 \(102.jpg\): no detection"),
    (lambda r: r[:1] + [dict(r[1], category_id=77)] + r[2:],
     r"detection 1 \(image 101\): category_id 77 is not a category"),
    (lambda r: r[:2] + [dict(r[2], score=float("nan"))] + r[3:],
     r"detection 2 \(image 101\): score nan is not a finite number"),
    (lambda r: r + [dict(r[0], image_id=999)],
     r"detection 6 \(image 999\): image_id 999 is not in the image-info file"),
    (lambda r: [dict(r[0], score=1.5)] + r[1:],
     r"detection 0 \(image 101\): score 1.5"),
    (lambda r: r[:3] + [dict(r[3], bbox=[0.0, 0.0, 301.0, 10.0])] + r[4:],
     r"detection 3 \(image 102\): bbox \[0.0, 0.0, 301.0, 10.0\] leaves the 300x500 image"),
    (lambda r: r[:4] + [dict(r[4], bbox=[5.0, 5.0, 0.0, 10.0])] + r[5:],
     r"detection 4 \(image 102\): bbox .* non-positive width"),
    (lambda r: r[:5] + [dict(r[5], bbox=[1.0, float("inf"), 3.0, 3.0])],
     r"detection 5 \(image 102\): bbox .* non-finite"),
    (lambda r: [{k: v for k, v in r[0].items() if k != "score"}] + r[1:],
     r"detection 0 \(image 101\): missing field\(s\) score"),
    (lambda r: [dict(r[0], category_id="1")] + r[1:],
     r"detection 0 \(image 101\): category_id '1' is not an integer"),
    (lambda r: [dict(r[0], segmentation=[])] + r[1:],
     r"detection 0 \(image 101\): unexpected field\(s\) segmentation"),
])
def test_corrupted_results_are_rejected_naming_image_and_field(tmp_path, corrupt, expected):
    info = _info()
    bad = corrupt(_results(info))
    assert json.dumps(bad, allow_nan=True)  # still JSON-able: the checks are about content
    _problems(bad, info)
    with pytest.raises(SubmissionError, match=expected):
        write_submission(bad, info, tmp_path, "bad")
    assert not list(tmp_path.iterdir()), "a rejected submission must not leave files behind"


def test_per_image_cap_and_capping(tmp_path):
    info = _info()
    results = _results(info, per_image=4)
    assert "image 101: 4 detections, more than the cap of 3" in _problems(results, info, max_per_image=3)
    capped = cap_per_image(results, 3)
    validate_results(capped, info, max_per_image=3)
    kept = [d["score"] for d in capped if d["image_id"] == 101]
    assert kept == pytest.approx([0.9, 0.8, 0.7])


def test_failed_rewrite_keeps_the_previous_submission(tmp_path):
    info = _info()
    json_path, zip_path = write_submission(_results(info), info, tmp_path, "run1")
    before = json_path.read_bytes(), zip_path.read_bytes()
    broken = _results(info)
    broken[0]["score"] = float("nan")
    with pytest.raises(SubmissionError):
        write_submission(broken, info, tmp_path, "run1")
    assert (json_path.read_bytes(), zip_path.read_bytes()) == before


def test_bad_names_and_zip_layouts(tmp_path):
    with pytest.raises(ValueError, match="submission name"):
        submission_filename("my run/1")
    info = _info()
    bad_zip = tmp_path / "x.zip"
    with zipfile.ZipFile(bad_zip, "w") as zf:
        zf.writestr("a/detections_test-dev2017_x_results.json", json.dumps(_results(info)))
    with pytest.raises(SubmissionError, match="exactly one .json at its top level"):
        validate_submission_file(bad_zip, info)
    wrong_name = tmp_path / "dets.json"
    wrong_name.write_text(json.dumps(_results(info)))
    with pytest.raises(SubmissionError, match="does not follow"):
        validate_submission_file(wrong_name, info)
    with pytest.raises(FileNotFoundError, match="nope.zip"):
        validate_submission_file(tmp_path / "nope.zip", info)


@pytest.mark.coco
def test_shared_testdev_image_info_accepts_a_covering_submission(shared_data, tmp_path):
    info_path = shared_data / "coco_testdev_sample/annotations/image_info_test-dev2017.json"
    info = json.loads(info_path.read_text())
    results = [{"image_id": img["id"], "category_id": 1 + (img["id"] % 3),
                "bbox": [1.0, 2.0, img["width"] / 2, img["height"] / 3], "score": 0.5}
               for img in info["images"]]
    json_path, zip_path = write_submission(results, info_path, tmp_path, "slice")
    assert validate_submission_file(zip_path, info_path) == 10
    with pytest.raises(SubmissionError, match=r"image \d+ \(\d+\.jpg\): no detection"):
        validate_results(results[1:], info_path)
