"""ATSS assignment: the batched, vectorised assigner vs a straightforward per-image, per-GT loop.

    python bench/assigner.py            # 16 images at 800x1333 (22,400 anchors each), 10/100/1000 GTs
    python bench/assigner.py --full     # same on CUDA when available, plus 2000 GTs per image
    python bench/assigner.py --images 4 --gts 10,100   # smaller

Both implementations must give identical assignments (checked on every case; the script exits
non-zero otherwise). Reports time (median of up to --repeats runs), the speed-up ratio and the
peak extra memory of each: on CPU the
growth of the process's peak RSS during the call (each measurement in a fresh subprocess), on CUDA
``torch.cuda.max_memory_allocated``. The loop reference is written the way the official code does
it per GT: full IoU/distance columns over all anchors, a stable sort per level, an anchors x GTs
matrix to resolve anchors claimed by several GTs. It is the tests' reference
(``tests/reference_assigners.py``), imported from there so that the loop the tests trust and the
loop this benchmark times are one piece of code.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the loop peer is the tests' reference assigner

from reference_assigners import reference_atss_assign  # noqa: E402

from detector.anchors import AnchorGenerator  # noqa: E402
from detector.assigners import atss_assign_batched  # noqa: E402

STRIDES = (8, 16, 32, 64, 128)


def make_inputs(num_images: int, num_gts: int, height: int, width: int, seed: int = 0, device: str = "cpu"):
    """Anchors of a padded ``height x width`` image (8S, one per location) and random GTs
    (log-uniform sides 8..512 px, clipped to the image): (anchors, counts, gt float[B, G, 4])."""
    ph, pw = -(-height // 32) * 32, -(-width // 32) * 32
    sizes = [(-(-ph // s), -(-pw // s)) for s in STRIDES]
    anchor_set = AnchorGenerator(STRIDES, 8.0, 1, (1.0,))(sizes, torch.device(device))
    gen = torch.Generator().manual_seed(seed)
    wh = torch.exp(torch.empty(num_images, num_gts, 2).uniform_(2.08, 6.24, generator=gen))  # 8..512 px
    cx = torch.rand(num_images, num_gts, generator=gen) * width
    cy = torch.rand(num_images, num_gts, generator=gen) * height
    boxes = torch.stack([cx - wh[..., 0] / 2, cy - wh[..., 1] / 2, cx + wh[..., 0] / 2, cy + wh[..., 1] / 2], -1)
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, width)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, height)
    return anchor_set.anchors, anchor_set.num_per_level, boxes.to(device)


def _run(method: str, images: int, gts: int, height: int, width: int, device: str, threads: int, repeats: int,
         queue) -> None:
    torch.set_num_threads(threads)
    anchors, counts, gt = make_inputs(images, gts, height, width, device=device)
    if method == "batched":
        def fn(boxes=gt):
            return atss_assign_batched(anchors, counts, boxes)
    else:
        def fn(boxes=gt):
            return torch.stack([reference_atss_assign(anchors, counts, b) for b in boxes])
    fn(gt[:1, :2])  # warm-up: thread pool, kernels, allocator
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # Median of up to `repeats` runs (fewer once 30 s have been spent): the box is shared, and a
    # single run can be slowed by other jobs. Memory is the peak over all runs.
    times = []
    while len(times) < repeats and sum(times) < 30.0:
        t0 = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    queue.put({"seconds": seconds, "peak_bytes": max(peak, 0), "result": result.cpu().numpy()})


def measure(method: str, images: int, gts: int, height: int, width: int, device: str, threads: int,
            repeats: int = 3) -> dict:
    """Run one case in a fresh process so peak-memory figures do not leak between cases."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(method, images, gts, height, width, device, threads, repeats, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--gts", default="10,100,1000", help="comma-separated GTs per image")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for both (1: stable figures on a shared machine)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (median reported)")
    parser.add_argument("--full", action="store_true", help="GPU size: CUDA if available, adds 2000 GTs")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args(argv)
    if args.full:
        args.device = "cuda" if torch.cuda.is_available() else args.device
        args.gts = args.gts + ",2000"
    anchors, counts, _ = make_inputs(1, 1, args.height, args.width)
    print(f"ATSS assignment, {args.images} images {args.height}x{args.width} ({anchors.shape[0]} anchors each, "
          f"levels {counts}), k=9, device {args.device}, torch threads {args.threads}")
    header = f"{'GTs/img':>8} | {'loop s':>8} | {'batched s':>9} | {'speed-up':>8} | {'loop peak MB':>12} | " \
             f"{'batched peak MB':>15} | identical"
    print(header)
    print("-" * len(header))
    rows, ok = [], True
    for gts in [int(x) for x in args.gts.split(",")]:
        ref = measure("loop", args.images, gts, args.height, args.width, args.device, args.threads,
                      args.repeats)
        new = measure("batched", args.images, gts, args.height, args.width, args.device, args.threads,
                      args.repeats)
        same = bool((ref["result"] == new["result"]).all())
        ok &= same
        row = {"gts_per_image": gts, "loop_s": ref["seconds"], "batched_s": new["seconds"],
               "speedup": ref["seconds"] / new["seconds"], "loop_peak_mb": ref["peak_bytes"] / 2**20,
               "batched_peak_mb": new["peak_bytes"] / 2**20, "identical": same,
               "positives": int((new["result"] >= 0).sum())}
        rows.append(row)
        print(f"{gts:>8} | {row['loop_s']:>8.2f} | {row['batched_s']:>9.3f} | {row['speedup']:>7.1f}x | "
              f"{row['loop_peak_mb']:>12.0f} | {row['batched_peak_mb']:>15.0f} | {same}")
    if args.json:
        print(json.dumps(rows))
    if not ok:
        print("MISMATCH between the batched assigner and the loop reference", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
