"""One GPU check, no Ray, no install (run it through bench/gpu_check.sh): R-50 ATSS at 800x1333.

1. training images/s and peak memory, fp32 and bf16 autocast (uint8 input: the detector normalises
   on the GPU), plus the check that uint8 input gives the losses of host-normalised float input;
2. inference images/s, fp32 and bf16;
3. DCN (``dcn_stages=(3, 4, 5)`` + ``dcn_in_tower``): torchvision's CUDA deform_conv2d against its
   CPU kernel on the same small input (forward and gradients), then R-50-DCN training images/s;
4. input pipeline with GPU decode: ``EncodedBatch.to("cuda")`` (batched nvJPEG, resize, flip, pad)
   in images/s of wall time and the host CPU per image, against the CPU pipeline (``read_image`` +
   ``resize_flip`` + ``pad_images``) on the same JPEGs, and how far the two batches' pixels differ.

Needs only torch, torchvision, numpy, pillow and pyarrow (already on the project's GPU image).
Prints a markdown report; ``--json PATH`` writes the figures too. Sizes: ``--batch`` images per
step (default 8), ``--steps`` timed steps (default 10).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detector import build_detector, get_preset  # noqa: E402
from pipeline.data import (DetectionTransform, EncodedBatch, EncodedImage, get_resize_size, pad_images,  # noqa: E402
                           read_bytes, read_image, resize_flip)

H, W = 800, 1333
say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731


def make_batch(batch: int, num_classes: int, device, seed: int = 0):
    """uint8 ``[B, 3, 800, 1344]`` images (each 800x1333 valid) and 7 random boxes per image."""
    g = torch.Generator().manual_seed(seed)
    images = pad_images([torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g) for _ in range(batch)])
    targets = []
    for _ in range(batch):
        xy = torch.rand(7, 2, generator=g) * torch.tensor([W - 320.0, H - 320.0])
        wh = 16 + torch.rand(7, 2, generator=g) * 300
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(1, num_classes + 1, (7,), generator=g).to(device)})
    return images.to(device), targets, [(H, W)] * batch


def timed(fn, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def train_speed(cfg, batch: int, steps: int, amp: bool) -> dict:
    torch.manual_seed(0)
    model = build_detector(cfg).cuda().train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                          weight_decay=1e-4)
    images, targets, sizes = make_batch(batch, cfg.num_classes, "cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            losses = model(images, targets, image_sizes=sizes)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = timed(step, 2, steps)
    res = {"images_per_s": batch / statistics.median(times),
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30}
    del model, opt
    torch.cuda.empty_cache()
    return res


def infer_speed(cfg, batch: int, steps: int, amp: bool) -> dict:
    torch.manual_seed(0)
    model = build_detector(cfg).cuda().eval()
    images, _, sizes = make_batch(batch, cfg.num_classes, "cuda")

    @torch.inference_mode()
    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return model(images, image_sizes=sizes)

    times = timed(run, 2, steps)
    del model
    torch.cuda.empty_cache()
    return {"images_per_s": batch / statistics.median(times)}


def normalisation_parity(cfg) -> dict:
    """uint8 input normalised on the GPU vs the same pixels normalised as float32 beforehand."""
    torch.manual_seed(0)
    model = build_detector(cfg).cuda().train()
    images, targets, sizes = make_batch(2, cfg.num_classes, "cuda", seed=1)
    floats = model.normalize(images, sizes)
    a = model(images, targets, image_sizes=sizes)
    b = model(floats.clone(), targets, image_sizes=sizes)
    return {k: float((a[k] - b[k]).abs() / b[k].abs().clamp(min=1e-12)) for k in a}


def dcn_parity() -> dict:
    """CUDA deform_conv2d vs its CPU kernel, forward and input/offset/mask/weight gradients."""
    from torchvision.ops import deform_conv2d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 24, 32, generator=g, dtype=torch.float64)
    off = torch.randn(2, 18, 24, 32, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(2, 9, 24, 32, generator=g, dtype=torch.float64)
    w = torch.randn(8, 16, 3, 3, generator=g, dtype=torch.float64) * 0.1

    def grads(device):
        ts = [t.to(device).requires_grad_() for t in (x, off, mask, w)]
        y = deform_conv2d(ts[0], ts[1], ts[3], padding=1, mask=ts[2])
        y.square().sum().backward()
        return [y.detach().cpu()] + [t.grad.cpu() for t in ts]

    cpu, cuda = grads("cpu"), grads("cuda")
    names = ["output", "grad_input", "grad_offset", "grad_mask", "grad_weight"]
    return {n: float((a - b).abs().max() / b.abs().max()) for n, a, b in zip(names, cuda, cpu)}


def synthetic_jpegs(folder: Path, count: int) -> list[Path]:
    """Photo-like JPEGs (smooth gradients, shapes, sensor noise), 480-640 px, quality 90."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        w, h = (640, int(rng.choice([427, 480]))) if i % 3 else (480, 640)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * rng.uniform(0.1, 0.4) + yy * rng.uniform(0.1, 0.4) + rng.uniform(0, 90)) % 256
                         for _ in range(3)], -1)
        im = Image.fromarray(base.astype(np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(12):
            x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
            d.ellipse([x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200)],
                      fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        arr = np.asarray(im.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.int16)
        arr = np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255).astype(np.uint8)
        p = folder / f"{i:04d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(p)
    return paths


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gpu_decode(paths: list[Path], batch: int, rounds: int, device: str = "cuda") -> dict:
    tf = DetectionTransform(H, W, flip_prob=0.5)
    rng = np.random.default_rng(0)
    items = []
    for p in paths:
        data = read_bytes(p)
        h0, w0 = read_image(p).shape[-2:]
        items.append(EncodedImage(tf.geometry(h0, w0, rng), data=data, path=str(p)))
    batches = [items[s:s + batch] for s in range(0, len(items) - batch + 1, batch)]
    n = len(batches) * batch

    def on_gpu():
        return [EncodedBatch(bk).pin_memory().to(device) if device.startswith("cuda") else EncodedBatch(bk).to(device)
                for bk in batches]

    def on_cpu():
        return [pad_images([resize_flip(read_image(it.path), it.geometry) for it in bk]) for bk in batches]

    on_gpu()  # nvJPEG handles, cudnn, allocator
    wall, cpu = [], []
    for _ in range(rounds):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        on_gpu()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    host = []
    for _ in range(rounds):
        c0 = time.process_time()
        on_cpu()
        host.append(time.process_time() - c0)
    diff = [(a.cpu().float() - b.float()).abs() for a, b in zip(on_gpu(), on_cpu())]
    return {"images": n, "batch": batch,
            "gpu_decode_images_per_s_wall": n / statistics.median(wall),
            "gpu_decode_host_cpu_ms_per_image": 1e3 * statistics.median(cpu) / n,
            "cpu_pipeline_images_per_cpu_s": n / statistics.median(host),
            "pixels_mean_abs_diff_vs_cpu": float(torch.cat([d.flatten() for d in diff]).mean()),
            "pixels_max_abs_diff_vs_cpu": float(max(d.max() for d in diff))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--images", help="a folder of JPEGs for part 4 (default: 64 synthetic ones)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: train,infer,dcn,decode")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("no CUDA device: this check is for a GPU machine")
    import torchvision

    warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)
    torch.backends.cudnn.benchmark = True
    skip = set(filter(None, args.skip.split(",")))
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "torchvision": torchvision.__version__, "batch": args.batch, "size": f"{H}x{W}"}
    cfg = get_preset("atss_r50")
    if "train" not in skip:
        say("normalisation parity ...")
        res["uint8_vs_float_loss_rel_diff"] = normalisation_parity(cfg)
        for name, amp in (("fp32", False), ("bf16", True)):
            say(f"training {name} ...")
            res[f"train_{name}"] = train_speed(cfg, args.batch, args.steps, amp)
    if "infer" not in skip:
        for name, amp in (("fp32", False), ("bf16", True)):
            say(f"inference {name} ...")
            res[f"infer_{name}"] = infer_speed(cfg, args.batch, args.steps, amp)
    if "dcn" not in skip:
        say("DCN ...")
        res["dcn_cuda_vs_cpu_rel_err"] = dcn_parity()
        dcn = get_preset("atss_r50", dcn_stages=(3, 4, 5), dcn_in_tower=True)
        res["train_dcn_bf16"] = train_speed(dcn, max(2, args.batch // 4), args.steps, True)
    if "decode" not in skip:
        say("GPU decode ...")
        folder = Path(args.images) if args.images else None
        paths = sorted(folder.glob("*.jpg"))[:64] if folder else synthetic_jpegs(Path("/tmp/atss_gpu_check_jpegs"), 64)
        res["input_pipeline"] = gpu_decode(paths, args.batch, rounds=3)
    report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


def report(res: dict) -> None:
    print(f"GPU check: {res['gpu']}, torch {res['torch']}, torchvision {res['torchvision']}, "
          f"R-50 ATSS {res['size']}, batch {res['batch']}\n")
    print("| measure | fp32 | bf16 |")
    print("|---|---:|---:|")
    if "train_fp32" in res:
        print(f"| training images/s | {res['train_fp32']['images_per_s']:.1f} | {res['train_bf16']['images_per_s']:.1f} |")
        print(f"| training peak memory GiB | {res['train_fp32']['peak_memory_gib']:.1f} | "
              f"{res['train_bf16']['peak_memory_gib']:.1f} |")
    if "infer_fp32" in res:
        print(f"| inference images/s | {res['infer_fp32']['images_per_s']:.1f} | {res['infer_bf16']['images_per_s']:.1f} |")
    if "train_dcn_bf16" in res:
        d = res["train_dcn_bf16"]
        print(f"| R-50-DCN training images/s (batch {max(2, res['batch'] // 4)}) | | {d['images_per_s']:.1f} |")
    for key in ("uint8_vs_float_loss_rel_diff", "dcn_cuda_vs_cpu_rel_err"):
        if key in res:
            print(f"\n{key}: " + ", ".join(f"{k} {v:.1e}" for k, v in res[key].items()))
    if "input_pipeline" in res:
        ip = res["input_pipeline"]
        print(f"\nInput pipeline, {ip['images']} JPEGs to 800x1333, batches of {ip['batch']}: GPU decode "
              f"{ip['gpu_decode_images_per_s_wall']:.0f} img/s wall, {ip['gpu_decode_host_cpu_ms_per_image']:.2f} ms "
              f"host CPU per image; CPU pipeline {ip['cpu_pipeline_images_per_cpu_s']:.0f} img per CPU-s; "
              f"pixels vs CPU decode: mean |diff| {ip['pixels_mean_abs_diff_vs_cpu']:.2f}, "
              f"max {ip['pixels_max_abs_diff_vs_cpu']:.0f}")


if __name__ == "__main__":
    main()
