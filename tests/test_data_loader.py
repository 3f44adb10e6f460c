"""DataConfig, samplers and build_dataloader on a small synthetic set (no Ray, no COCO needed)."""
from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from detector import build_detector, get_preset
from detector.model import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data import (DataConfig, EncodedBatch, GroupedBatchSampler, InferenceBatchSampler, build_dataloader,
                           build_dataset, collate, pad_images)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return DataConfig.tiny(cache_dir=str(tmp_path_factory.mktemp("syncache")), synthetic_train_images=40,
                           synthetic_val_images=12, synthetic_image_size=(96, 160),
                           train_min_size=(96, 128), test_min_size=112, max_size=192)


# -- DataConfig -----------------------------------------------------------------------------------
def test_config_defaults_are_the_papers():
    c = DataConfig()
    assert (c.train_min_size, c.max_size, c.test_min_size, c.flip_prob, c.size_divisible) == (800, 1333, 800, 0.5, 32)
    assert c.source == "synthetic"


def test_config_round_trip_and_unknown_key():
    c = DataConfig(source="coco:/data/coco", train_min_size=(640, 800))
    d = c.to_dict()
    assert d["train_min_size"] == [640, 800]
    assert DataConfig.from_dict(d) == c
    with pytest.raises(ValueError, match="train_min_szie"):
        DataConfig.from_dict({"train_min_szie": 800})


@pytest.mark.parametrize("bad, match", [
    (dict(source="cocoo:/x"), "source"), (dict(source="coco:"), "root"),
    (dict(train_min_size=(800, 640)), "lo <= hi"), (dict(train_min_size=0), "train_min_size"),
    (dict(flip_prob=1.5), "flip_prob"), (dict(max_size=-1), "max_size"),
    (dict(test_min_size=(600, 800)), "test_min_size"), (dict(source="files"), "train_ann"),
    (dict(synthetic_num_classes=0), "synthetic_num_classes"),
    (dict(train_ann="/x/a.json", train_images="/x"), "source='files'"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**bad)


def test_tiny_is_cpu_small():
    c = DataConfig.tiny()
    assert c.source == "synthetic" and c.max_size <= 320 and max(c.synthetic_image_size) <= 192


# -- samplers -------------------------------------------------------------------------------------
def test_grouped_batches_have_one_orientation_and_cover_every_image():
    groups = np.array([0, 1] * 25 + [1] * 7)
    s = GroupedBatchSampler(groups, 4, seed=3, infinite=False)
    batches = list(s)
    assert len(batches) == len(s) == len(groups) // 4
    mixed = [b for b in batches if len({groups[i] for i, _ in b}) > 1]
    assert len(mixed) <= 1
    seen = collections.Counter(i for b in batches for i, _ in b)
    assert len(seen) >= len(groups) - 3  # only the < batch_size tail may be left out
    s.set_epoch(1)
    assert [i for b in s for i, _ in b] != [i for b in batches for i, _ in b]


def test_grouped_infinite_is_pure_and_resumable():
    groups = np.array([0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1])
    s = GroupedBatchSampler(groups, 3, seed=7)
    it = iter(s)
    first = [next(it) for _ in range(20)]
    assert all(len({groups[i] for i, _ in b}) == 1 for b in first)
    it2 = iter(GroupedBatchSampler(groups, 3, seed=7, start_iter=12))
    assert [next(it2) for _ in range(8)] == first[12:]


def test_grouped_sampler_shards_ranks_disjointly():
    groups = np.zeros(24, dtype=int)
    per_rank = [[i for b in GroupedBatchSampler(groups, 2, seed=1, num_replicas=3, rank=r, infinite=False)
                 for i, _ in b] for r in range(3)]
    flat = sum(per_rank, [])
    assert sorted(flat) == list(range(24))
    assert len({len(p) for p in per_rank}) == 1


def test_inference_sampler_sees_every_image_once():
    for n, reps in [(10, 3), (7, 4), (2, 3)]:
        got = [i for r in range(reps) for b in InferenceBatchSampler(n, 3, num_replicas=reps, rank=r) for i in b]
        assert got == list(range(n))


# -- loaders --------------------------------------------------------------------------------------
def test_train_loader_batches(cfg):
    dl = build_dataloader(cfg, "train", batch_size=4, train=True, seed=0)
    it = iter(dl)
    for _ in range(3):
        images, targets = next(it)
        assert images.dtype == torch.uint8 and images.shape[0] == 4
        assert images.shape[-1] % 32 == 0 and images.shape[-2] % 32 == 0
        orient = {t["image_size"][0] > t["image_size"][1] for t in targets}
        assert len(orient) == 1
        for t in targets:
            assert 96 <= min(t["image_size"]) <= 128 and max(t["image_size"]) <= 192
            assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
            assert len(t["boxes"]) >= 1 and t["labels"].min() >= 1


def test_train_loader_is_deterministic_across_worker_counts(cfg):
    def first_batches(workers):
        it = iter(build_dataloader(cfg, "train", 2, train=True, seed=5, num_workers=workers))
        return [next(it) for _ in range(3)]

    a, b = first_batches(0), first_batches(2)
    for (ia, ta), (ib, tb) in zip(a, b):
        assert torch.equal(ia, ib)
        assert [t["image_id"] for t in ta] == [t["image_id"] for t in tb]
        assert all(torch.equal(x["boxes"], y["boxes"]) and x["flipped"] == y["flipped"] for x, y in zip(ta, tb))


def test_eval_loader_complete_across_ranks(cfg):
    ids = []
    for r in range(3):
        for images, targets in build_dataloader(cfg, "val", 4, train=False, num_replicas=3, rank=r):
            ids += [t["image_id"] for t in targets]
            for t in targets:
                assert not t["flipped"] and (min(t["image_size"]) == 112 or max(t["image_size"]) == 192)
    ds = build_dataset(cfg, "val", train=False)
    assert ids == ds.image_ids.tolist() and len(ids) == cfg.synthetic_val_images


def test_collate_pads_with_zeros_bottom_right():
    a, b = torch.ones(3, 40, 50), torch.full((3, 70, 33), 2.0)
    images, targets = collate([(a, {"i": 0}), (b, {"i": 1})])
    assert images.shape == (2, 3, 96, 64)
    assert torch.equal(images[0, :, :40, :50], a) and images[0, :, 40:].abs().sum() == 0
    assert images[0, :, :, 50:].abs().sum() == 0 and torch.equal(images[1, :, :70, :33], b)
    assert [t["i"] for t in targets] == [0, 1]


def _ddp_worker(rank, world, init_file, cfg_dict, out_dir):
    import json as _json

    import torch.distributed as dist

    from pipeline.data import DataConfig, build_dataloader

    dist.init_process_group("gloo", init_method=f"file://{init_file}", world_size=world, rank=rank)
    try:
        cfg = DataConfig.from_dict(cfg_dict)
        val = [t["image_id"] for _, ts in build_dataloader(cfg, "val", 3, train=False) for t in ts]
        train_loader = build_dataloader(cfg, "train", 2, train=True, seed=4, infinite=False)
        train = [t["image_id"] for _, ts in train_loader for t in ts]
        gathered = [None] * world
        dist.all_gather_object(gathered, {"val": val, "train": train, "batches": len(train_loader)})
        if rank == 0:
            (out_dir / "result.json").write_text(_json.dumps(gathered))
    finally:
        dist.destroy_process_group()


def test_loaders_follow_torch_distributed(cfg, tmp_path):
    """Two gloo ranks, as Ray Train sets them up: no explicit rank arguments anywhere."""
    import json as _json

    import torch.multiprocessing as mp

    build_dataset(cfg, "train", True)  # generate the cache once, before the ranks start
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), cfg.to_dict(), tmp_path), nprocs=2,
                       start_method="spawn")
    r0, r1 = _json.loads((tmp_path / "result.json").read_text())
    val_ids = build_dataset(cfg, "val", False).image_ids.tolist()
    assert r0["val"] + r1["val"] == val_ids  # every image once, in order, split between ranks
    assert r0["batches"] == r1["batches"] and set(r0["train"]).isdisjoint(r1["train"])
    assert len(r0["train"]) == len(r1["train"]) == r0["batches"] * 2


def test_collate_keeps_uint8():
    a = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    images, _ = collate([(a, {}), (a[:, :33], {})])
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 64, 64)
    assert torch.equal(images[1, :, :33, :50], a[:, :33]) and images[1, :, 33:].sum() == 0


# -- device-side normalisation: the same numbers as the former host-side pipeline -----------------
def _host_normalised_batch(images: list, size_divisible: int = 32) -> torch.Tensor:
    """The pipeline before issue 16: float32 normalisation per image on the host, then zero padding."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1) * 255.0
    return pad_images([(im.to(torch.float32) - mean) / std for im in images], size_divisible)


def test_uint8_batch_gives_the_same_losses_and_detections_as_host_normalised(cfg):
    ds = build_dataset(cfg, "train", train=True)
    samples = [ds[(i, 7)] for i in (0, 3, 5)]  # mixed sizes: real padding inside the batch
    raw, targets = collate(samples)
    assert raw.dtype == torch.uint8
    before = _host_normalised_batch([im for im, _ in samples])
    sizes = [t["image_size"] for t in targets]
    assert len({tuple(s) for s in sizes}) > 1
    torch.manual_seed(0)
    # score_thresh 0: an untrained head's scores sit near prior_prob, under the default threshold
    model = build_detector(get_preset("atss_tiny", num_classes=ds.category_map.num_classes, score_thresh=0.0))
    # The device-side normalisation itself is exact: same float32 ops, padding zeroed.
    assert torch.equal(model.normalize(raw, sizes), before)
    model.train()
    new = model(raw, targets, image_sizes=sizes)
    old = model(before, targets, image_sizes=sizes)
    for k in old:
        torch.testing.assert_close(new[k], old[k], rtol=1e-6, atol=1e-7)
    model.eval()
    with torch.no_grad():
        d_new = model(raw, image_sizes=sizes, original_sizes=[t["orig_size"] for t in targets])
        d_old = model(before, image_sizes=sizes, original_sizes=[t["orig_size"] for t in targets])
        # list input (TTA's path): padded and masked per image from the list items' own sizes
        d_list = model([im for im, _ in samples], original_sizes=[t["orig_size"] for t in targets])
    for a, b, c in zip(d_new, d_old, d_list):
        assert len(b["boxes"]) > 0
        for k in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[k], b[k])
            torch.testing.assert_close(c[k], b[k])


def test_model_rejects_mixed_or_integer_non_uint8_input():
    model = build_detector(get_preset("atss_tiny", num_classes=2)).eval()
    u8 = torch.zeros(3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="all uint8 pixels or all normalised floats"):
        model([u8, u8.float()])
    with pytest.raises(ValueError, match="uint8 pixels or normalised floats, got torch.int32"):
        model(u8[None].int())


# -- GPU decode path, run on the CPU: the same batch as the host decode -----------------------------
def test_encoded_batch_decodes_to_the_host_pipelines_batch(cfg):
    host = build_dataset(cfg, "train", train=True)
    deferred = build_dataset(cfg.replace(gpu_decode=True), "train", train=True)
    keys = [(0, 11), (4, 12), (9, 13)]
    images, targets = collate([host[k] for k in keys])
    enc, enc_targets = collate([deferred[k] for k in keys])
    assert isinstance(enc, EncodedBatch) and enc.shape == tuple(images.shape)
    for a, b in zip(targets, enc_targets):
        assert a["image_size"] == b["image_size"] and a["flipped"] == b["flipped"]
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["crowd_boxes"], b["crowd_boxes"])
    assert torch.equal(enc.pin_memory().to("cpu") if torch.cuda.is_available() else enc.to("cpu"), images)


def test_gpu_decode_loader_batches(cfg):
    dl = build_dataloader(cfg.replace(gpu_decode=True), "val", batch_size=3, train=False, num_workers=0)
    images, targets = next(iter(dl))
    assert isinstance(images, EncodedBatch) and len(images) == 3
    out = images.to("cpu")
    assert out.dtype == torch.uint8 and out.shape[-1] % 32 == 0


def test_gpu_decode_config_is_validated():
    with pytest.raises(ValueError, match="gpu_decode"):
        DataConfig(gpu_decode="yes")


def test_flip_before_resize_gives_the_pixels_of_resize_before_flip():
    """resize_flip mirrors the small decoded image first; the previous pipeline resized first."""
    from torchvision.transforms.v2 import functional as TF

    from pipeline.data import get_resize_size, resize_flip

    g = torch.Generator().manual_seed(0)
    for h0, w0 in [(97, 101), (131, 230), (480, 640), (427, 640), (640, 359)]:
        # channels-last in memory, as decode_jpeg returns it
        im = torch.randint(0, 256, (h0, w0, 3), dtype=torch.uint8, generator=g).permute(2, 0, 1)
        for min_size, max_size in ((96, 160), (160, 256), (800, 1333)):
            h, w, scale = get_resize_size(h0, w0, min_size, max_size)
            want = TF.resize(im, [h, w], antialias=True).flip(-1)
            assert torch.equal(resize_flip(im, (h, w, scale, True)), want), (h0, w0, h, w)


def test_input_pipeline_bench_smallest_size(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import input_pipeline

    res = input_pipeline.main(["--images", "2", "--rounds", "1", "--batch", "2"])
    assert res["contenders"]["reference: decode_jpeg + resize"]["ratio_to_reference"] == 1.0
    assert all(r["images_per_cpu_s"] > 0 for r in res["contenders"].values())
    assert res["workers_per_gpu_at_60"]["now"] >= 1
    assert "| dataset + collate (end to end) |" in capsys.readouterr().out
