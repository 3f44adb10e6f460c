"""Input pipeline at the paper's sizes (shorter side 800, longer at most 1333): images per CPU-second.

Every contender runs in this process on one thread over the same JPEGs, alternating round by round,
timed with ``time.process_time`` (CPU time, so other load on the machine matters less than for wall
time); the table gives medians over rounds and ratios to the peer: ``torchvision.io.decode_jpeg`` +
the same uint8 antialiased resize, nothing else. Contenders:

- the training dataset (``CocoDetection(train=True)``: decode, resize, random flip; uint8 out);
- the same dataset + ``collate`` in batches (end to end, what one loader worker does);
- the dataset with ``gpu_decode=True`` + collate: the host part only (file read + JPEG header; the
  decode, resize and flip happen on the GPU when the batch moves there);
- the pipeline before issue 16: PIL decode, resize, flip, float32 normalisation on the host, float
  collate (kept here, inline, as the "before" figure).

A per-stage table splits the costs (read, PIL decode, ``decode_jpeg``, resize, flip, host
normalisation, collate of uint8 vs float32). The last line gives the loader workers (one core
each) that one GPU needs to be fed 60 images/s, from the end-to-end rate.

Images: the real JPEGs of ``../shared/data/coco_tiny/train2017`` when present, otherwise synthetic
JPEGs (``pipeline.synthetic``, 480-640 px; smoother than photos, so they decode faster).

    python bench/input_pipeline.py             # 40 images x 5 rounds (~1-2 min on 2 cores)
    python bench/input_pipeline.py --full      # all 80 images x 9 rounds
    python bench/input_pipeline.py --json      # also the figures as one JSON object on the last line
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detector.model import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from pipeline.data import (CocoDetection, DetectionTransform, collate, get_resize_size, pad_images,  # noqa: E402
                           read_image)

TINY = REPO.parent / "shared" / "data" / "coco_tiny"
MIN_SIZE, MAX_SIZE = 800, 1333
GPU_RATE = 60.0  # images/s one GPU trains on at 800x1333 (R-50, bf16, a recent data-centre GPU)


def find_data(workdir: Path) -> tuple[Path, Path, str]:
    """``(annotation json, image dir, description)``: coco_tiny train, or a synthetic fallback."""
    if (TINY / "train2017").is_dir():
        return TINY / "annotations/instances_train2017.json", TINY / "train2017", f"real COCO JPEGs ({TINY})"
    from pipeline.synthetic import SyntheticSpec, ensure_synthetic

    root = ensure_synthetic(SyntheticSpec(num_train=80, num_val=1, image_size=(480, 640), num_classes=5), workdir)
    return root / "annotations/instances_train2017.json", root / "train2017", "synthetic JPEGs 480-640 px"


# ---------------------------------------------------------------------------------------------
# the peer and the "before" pipeline (reproduced inline: the library no longer normalises on the host)
# ---------------------------------------------------------------------------------------------
def reference(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's decode_jpeg + the same uint8 antialiased resize."""
    return TF.resize(decode_jpeg(torch.from_numpy(np.fromfile(path, dtype=np.uint8)), mode=ImageReadMode.RGB),
                     list(size), antialias=True)


MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1) * 255.0
STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1) * 255.0


def pil_decode(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def before_item(path: Path, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """The dataset transform before issue 16: PIL decode, resize, flip, float32 normalisation."""
    image = TF.resize(pil_decode(path), list(size), antialias=True)
    if flip:
        image = image.flip(-1)
    return (image.to(torch.float32) - MEAN) / STD


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def cpu_time(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def run(args) -> dict:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)
    with tempfile.TemporaryDirectory() as tmp:
        ann, image_dir, source = find_data(Path(args.workdir or tmp))
        tf = DetectionTransform(MIN_SIZE, MAX_SIZE, flip_prob=0.5)
        ds = CocoDetection(ann, image_dir, train=True, transform=tf)
        gpu_ds = CocoDetection(ann, image_dir, train=True, transform=tf, gpu_decode=True)
        n = min(args.images, len(ds))
        keys = [(i, 1000 + i) for i in range(n)]
        paths = [ds.image_path(i) for i in range(n)]
        sizes, flips = [], []
        for k in keys:  # the very draws the dataset makes, so every contender does the same work
            _, t = ds[k]
            sizes.append(t["image_size"])
            flips.append(t["flipped"])
        b = args.batch
        # Batches of one orientation, as the aspect-ratio grouped sampler makes them (less padding).
        grouped = sorted(range(n), key=lambda i: sizes[i][0] > sizes[i][1])
        batches = [grouped[s:s + b] for s in range(0, n - n % b, b)]

        # Every contender is a function of one batch (dataset positions); they run batch by batch
        # in rotating order, so all see the same load on a shared machine.
        contenders = {
            "reference: decode_jpeg + resize": lambda bk: [reference(paths[i], sizes[i]) for i in bk],
            "training dataset (decode_jpeg, flip, resize; uint8)": lambda bk: [ds[keys[i]] for i in bk],
            "dataset + collate (end to end)": lambda bk: collate([ds[keys[i]] for i in bk]),
            "gpu_decode dataset + collate (host part)": lambda bk: collate([gpu_ds[keys[i]] for i in bk]),
            "before: PIL, resize, flip, host normalise + collate":
                lambda bk: pad_images([before_item(paths[i], sizes[i], flips[i]) for i in bk]),
        }
        decoded = [read_image(p) for p in paths]
        resized = [TF.resize(im, list(s), antialias=True) for im, s in zip(decoded, sizes)]
        floats = [((im.to(torch.float32) - MEAN) / STD) for im in resized]
        stages = {
            "read file (page cache)": lambda bk: [np.fromfile(paths[i], dtype=np.uint8) for i in bk],
            "decode: PIL": lambda bk: [pil_decode(paths[i]) for i in bk],
            "decode: torchvision decode_jpeg": lambda bk: [read_image(paths[i]) for i in bk],
            "flip uint8 (decoded image)": lambda bk: [decoded[i].flip(-1) for i in bk],
            "resize uint8 to 800x1333 (antialiased)":
                lambda bk: [TF.resize(decoded[i], list(sizes[i]), antialias=True) for i in bk],
            "flip uint8 (resized image, before)": lambda bk: [resized[i].flip(-1) for i in bk],
            "normalise on the host, float32 (before)":
                lambda bk: [(resized[i].to(torch.float32) - MEAN) / STD for i in bk],
            f"collate uint8, batches of {b}": lambda bk: pad_images([resized[i] for i in bk]),
            f"collate float32, batches of {b} (before)": lambda bk: pad_images([floats[i] for i in bk]),
        }
        fns = {**contenders, **stages}
        say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
        say(f"{source}: {n} images in {len(batches)} batches, {args.rounds} rounds x {len(fns)} timings")
        for bk in batches:
            for fn in fns.values():
                fn(bk)  # warm-up: page cache, allocator, lazy inits
        names = list(fns)
        times: dict[str, list[float]] = {k: [] for k in names}  # per round: CPU s per image
        for r in range(args.rounds):
            total = dict.fromkeys(names, 0.0)
            for j, bk in enumerate(batches):
                for name in names[j % len(names):] + names[:j % len(names)]:
                    total[name] += cpu_time(lambda: fns[name](bk))
            for name in names:
                times[name].append(total[name] / (len(batches) * b))
            say(f"round {r + 1}/{args.rounds} done")
        bytes_u8 = sum(im.numel() for im in resized) / n
    ref_name = "reference: decode_jpeg + resize"
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = {k: {"ms_per_image": 1e3 * med[k], "images_per_cpu_s": 1 / med[k],
                # the median of per-round ratios: each round's contenders saw the same machine load
                "ratio_to_reference": statistics.median(r / t for r, t in zip(times[ref_name], times[k]))}
            for k in contenders}
    stage_rows = {k: {"ms_per_image": 1e3 * med[k]} for k in stages}
    e2e = 1 / med["dataset + collate (end to end)"]
    before = 1 / med["before: PIL, resize, flip, host normalise + collate"]
    gpu_host = 1 / med["gpu_decode dataset + collate (host part)"]
    return {
        "source": source, "images": n, "rounds": args.rounds, "batch": b,
        "mean_input_hw": [float(np.mean([s[0] for s in sizes])), float(np.mean([s[1] for s in sizes]))],
        "contenders": rows, "stages": stage_rows,
        "batch_mb_per_image": {"uint8": bytes_u8 / 2 ** 20, "float32 (before)": 4 * bytes_u8 / 2 ** 20},
        "workers_per_gpu_at_60": {"now": math.ceil(GPU_RATE / e2e), "before": math.ceil(GPU_RATE / before),
                                  "gpu_decode": math.ceil(GPU_RATE / gpu_host)},
        "cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
    }


def print_report(res: dict) -> None:
    h, w = res["mean_input_hw"]
    print(f"Input pipeline, {res['source']}: {res['images']} images resized to about {h:.0f}x{w:.0f} "
          f"(800x1333 rule), 1 thread, CPU time, median of {res['rounds']} rounds ({res['cpu']}, torch {res['torch']})\n")
    print("| pipeline | ms per image | images per CPU-s | vs decode_jpeg + resize |")
    print("|---|---:|---:|---:|")
    for k, r in res["contenders"].items():
        print(f"| {k} | {r['ms_per_image']:.2f} | {r['images_per_cpu_s']:.0f} | {r['ratio_to_reference']:.2f}x |")
    print("\n| stage | ms per image |")
    print("|---|---:|")
    for k, r in res["stages"].items():
        print(f"| {k} | {r['ms_per_image']:.2f} |")
    mb = res["batch_mb_per_image"]
    wk = res["workers_per_gpu_at_60"]
    print(f"\nBatch bytes per image (pinned memory, host-to-device copy): uint8 {mb['uint8']:.1f} MiB, "
          f"float32 before {mb['float32 (before)']:.1f} MiB.")
    print(f"Loader workers (one core each) to feed one GPU at {GPU_RATE:.0f} img/s: {wk['now']} now, "
          f"{wk['before']} before, {wk['gpu_decode']} with gpu_decode (plus the training process itself).")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=40, help="JPEGs per round (default 40)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, contenders alternate (default 5)")
    p.add_argument("--batch", type=int, default=2, help="collate batch size (default 2, images per GPU)")
    p.add_argument("--full", action="store_true", help="all 80 images, 9 rounds")
    p.add_argument("--workdir", help="where the synthetic fallback is generated (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON on the last line too")
    args = p.parse_args(argv)
    if args.full:
        args.images, args.rounds = 80, 9
    if args.images < args.batch or args.rounds < 1:
        p.error(f"--images must be >= --batch ({args.batch}) and --rounds >= 1")
    res = run(args)
    print_report(res)
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
