"""Training step and inference: our ATSS against torchvision's FCOS and RetinaNet, one process.

Every model gets the same backbone and FPN, the same head width and depth, the same classes, the
same input tensors and the same thread count, and they run alternating (A, B, C, A, B, C, ...)
after a warm-up, so drifts of the machine hit all of them alike. Reported per backbone:

* training step time (forward + losses + backward + SGD step), median over the rounds, and
  ``ATSS time / this model's time`` (<= 1.0: ours is no slower);
* inference images/s (forward + post-processing: thresholds, per-level top-k, decoding, NMS) and
  the same time ratio (< 1.0: ours is faster);
* on CPU also the process CPU time of both, with its ratios: on a shared machine other processes
  stretch the wall time, far less the CPU time this process spends;
* peak memory of one training step and one inference batch above what was live before it;
* a phase breakdown of the training step (input prep, backbone + FPN, head, losses incl. anchors
  and assignment, backward, optimiser) so a regression can be located.

The peers, built the way torchvision builds ``fcos_resnet50_fpn`` / ``retinanet_resnet50_fpn_v2``
but on our settings: torchvision ResNet with ``FrozenBatchNorm2d`` and the stem + res2 frozen
(``trainable_layers=3`` = our ``frozen_stages=2``), ``_resnet_fpn_extractor`` with C3-C5 and
``LastLevelP6P7(256, 256)`` (P6 from P5, as ours), 256 channels, heads of 4 convs x 256 with
GroupNorm(32), random init, score threshold 0.05, 1000 candidates per level, NMS 0.6, 100
detections (torchvision's FCOS applies its threshold to ``sqrt(cls * ctr)``, ours to ``cls``).
torchvision's RetinaNet has 9 anchors per location (3 scales x 3 ratios) and GIoU (v2); ATSS and
FCOS have 1. Our detector is built from the ``atss_r50`` preset (``backbone`` swapped for R-18).

Fair inputs: every model receives the same raw RGB images in [0, 1] (B x 3 x H x W, H and W
multiples of 32) and boxes. torchvision's models normalise inside ``model.transform``; ours
expects normalised input, so ImageNet normalisation of the batch is inside our timed step too.
torchvision's transform would also resize; its ``min_size``/``max_size`` are set to the input
size (scale factor 1) and its ``resize`` is replaced by the identity, because a bilinear resize
by exactly 1 returns the same pixels and our model has no resize step either. Its batching (a
copy into a padded tensor) stays in its time.

Post-processing load: with the paper's classifier prior (p = 0.01) an untrained model has no
candidate above the 0.05 threshold and inference would time an empty post-processing. All models
therefore start their classifier bias at ``logit(--cls-prior)`` (default 0.05): about half the
(location, class) pairs pass the threshold, so the per-level top-1000 cap, decoding and NMS do
the full work a trained model can hit. ``--cls-prior 0.01`` times the untrained case.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
the allocation before the step. On CPU, torch's profiler with ``profile_memory=True`` records
every tensor allocation and free of one step; the peak of their running sum is the step's peak
tensor memory (independent of the allocator caching or returning memory to the OS, which makes
RSS deltas unreliable). These profiled steps are separate from the timed ones.

    python bench/train_step.py             # R-18 and R-50, 2 images of 320x320, 1 thread (~3 min on 2 idle cores)
    python bench/train_step.py --full      # GPU: 4 images of 800x1344, more rounds
    python bench/train_step.py --profile   # + torch.profiler top ops of our ATSS training step
    python bench/train_step.py --json      # + all figures as one JSON object on the last line
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

# Idle OpenMP threads must not spin on cores other processes need (docs/training.md): set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torchvision
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detector import build_detector, get_preset  # noqa: E402
from detector.config import BACKBONES  # noqa: E402
from pipeline.environment import collect_environment  # noqa: E402
from detector.model import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

THREADS_HELP = ("torch intra-op threads, the same for every model (default 1: on 2 cores shared with other "
                "processes, OpenMP barriers make 2 threads burn and wait many times the work)")
PHASES = ("prep", "backbone_fpn", "head", "loss", "backward", "optimizer")
INFER_PHASES = ("prep", "backbone_fpn", "head", "post")


# ----------------------------------------------------------------------------------------------
# machine and inputs
# ----------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    """What the figures depend on (pipeline.environment: CPU kernels, GPU, versions, threads)."""
    return {**collect_environment(str(device)).to_dict(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def make_inputs(batch: int, height: int, width: int, num_gts: int, num_classes: int,
                seed: int = 0) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Raw RGB images float[B, 3, H, W] in [0, 1] and targets (``boxes`` float[G, 4] xyxy pixels
    with sides log-uniform from 16 px to 0.9 x the shorter image side, ``labels`` int64[G] in 1..num_classes)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, height, width, generator=g)
    targets = []
    for _ in range(batch):
        lo, hi = math.log(16.0), math.log(min(height, width) * 0.9)
        wh = torch.exp(lo + (hi - lo) * torch.rand(num_gts, 2, generator=g))
        xy = torch.rand(num_gts, 2, generator=g) * (torch.tensor([width, height]) - wh)
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(1, num_classes + 1, (num_gts,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


# ----------------------------------------------------------------------------------------------
# the contenders
# ----------------------------------------------------------------------------------------------
@dataclass
class Contender:
    """One model with its own view of the shared inputs.

    ``prep(images)`` turns the shared raw batch into the model's input (our normalisation, or the
    list torchvision takes); ``train_forward(x) -> losses dict`` and ``infer(x) -> detections``.
    ``backbone``/``head`` are the modules timed by the phase breakdown.
    """

    name: str
    model: nn.Module
    prep: Callable[[Tensor], object]
    train_forward: Callable[[object], dict[str, Tensor]]
    infer: Callable[[object], list[dict[str, Tensor]]]
    backbone: nn.Module
    head: nn.Module
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Tiny LR: every step does the full SGD work but the weights stay put, so later rounds
        # time the same model as the first.
        self.optimizer = torch.optim.SGD(params, lr=1e-5, momentum=0.9, weight_decay=1e-4)

    def train_step(self, images: Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.train_forward(self.prep(images))
        loss = sum(losses.values())
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.inference_mode()
    def infer_batch(self, images: Tensor) -> int:
        dets = self.infer(self.prep(images))
        return sum(int(d["boxes"].shape[0]) for d in dets)


def _logit(p: float) -> float:
    return -math.log((1 - p) / p)


def build_ours(backbone: str, num_classes: int, cls_prior: float, targets: list[dict], device: torch.device,
               preset: str = "atss_r50", name: str = "ATSS (ours)") -> Contender:
    cfg = get_preset(preset, backbone=backbone, num_classes=num_classes, prior_prob=cls_prior)
    model = build_detector(cfg).to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    tgts = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return Contender(name, model, prep=lambda x: (x - mean) / std,
                     train_forward=lambda x: model(x, tgts), infer=lambda x: model(x),
                     backbone=model.backbone, head=model.head)


def _tv_backbone(backbone: str):
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    body = getattr(torchvision.models, backbone)(weights=None, norm_layer=FrozenBatchNorm2d)
    # trainable_layers=3: layer2-4 train, stem + layer1 frozen (= our frozen_stages=2); P6 from P5.
    return _resnet_fpn_extractor(body, trainable_layers=3, returned_layers=[2, 3, 4],
                                 extra_blocks=LastLevelP6P7(256, 256))


def _tv_common(model: nn.Module, name: str, targets: list[dict], device: torch.device) -> Contender:
    # The inputs are already at the size: resizing by exactly 1 would return the same pixels.
    model.transform.resize = lambda image, target=None: (image, target)
    model.to(device)
    # torchvision's heads index their one-hot targets with the label itself: 0..C-1 for C outputs.
    tgts = [{"boxes": t["boxes"].to(device), "labels": (t["labels"] - 1).to(device)} for t in targets]
    return Contender(name, model, prep=lambda x: list(x.unbind(0)),
                     train_forward=lambda x: model(x, tgts), infer=lambda x: model(x),
                     backbone=model.backbone, head=model.head)


def build_tv_fcos(backbone: str, num_classes: int, cls_prior: float, size: tuple[int, int],
                  targets: list[dict], device: torch.device) -> Contender:
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    anchors = AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)  # as fcos_resnet50_fpn
    head = FCOSHead(256, 1, num_classes, num_convs=4)
    nn.init.constant_(head.classification_head.cls_logits.bias, _logit(cls_prior))
    model = FCOS(_tv_backbone(backbone), num_classes, min_size=min(size), max_size=max(size),
                 image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), anchor_generator=anchors,
                 head=head, score_thresh=0.05, nms_thresh=0.6, detections_per_img=100, topk_candidates=1000)
    return _tv_common(model, "torchvision FCOS", targets, device)


def build_tv_retinanet(backbone: str, num_classes: int, cls_prior: float, size: tuple[int, int],
                       targets: list[dict], device: torch.device) -> Contender:
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.retinanet import RetinaNetHead, _default_anchorgen

    anchors = _default_anchorgen()
    head = RetinaNetHead(256, anchors.num_anchors_per_location()[0], num_classes,
                         norm_layer=partial(nn.GroupNorm, 32))
    head.regression_head._loss_type = "giou"  # as retinanet_resnet50_fpn_v2
    nn.init.constant_(head.classification_head.cls_logits.bias, _logit(cls_prior))
    model = RetinaNet(_tv_backbone(backbone), num_classes, min_size=min(size), max_size=max(size),
                      image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), anchor_generator=anchors,
                      head=head, score_thresh=0.05, nms_thresh=0.6, detections_per_img=100, topk_candidates=1000)
    return _tv_common(model, "torchvision RetinaNet", targets, device)


def build_contenders(backbone: str, args, images: Tensor, targets: list[dict],
                     device: torch.device) -> list[Contender]:
    size = tuple(images.shape[-2:])
    builders = {
        "atss": lambda: build_ours(backbone, args.num_classes, args.cls_prior, targets, device),
        "fcos": lambda: build_ours(backbone, args.num_classes, args.cls_prior, targets, device,
                                   preset="fcos_r50", name="FCOS (ours)"),
        "tv_fcos": lambda: build_tv_fcos(backbone, args.num_classes, args.cls_prior, size, targets, device),
        "tv_retinanet": lambda: build_tv_retinanet(backbone, args.num_classes, args.cls_prior, size, targets,
                                                   device),
    }
    out = []
    for key in args.models:
        torch.manual_seed(0)
        out.append(builders[key]())
    return out


# ----------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(contenders: list[Contender], run: Callable[[Contender], object], warmup: int,
                     rounds: int, device: torch.device) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of ``run(c)`` for each contender, interleaved round by round:
    ``{name: {"wall": [...], "cpu": [...]}}``. ``cpu`` is this process's CPU time (all threads),
    which other processes on a shared machine disturb far less than the wall time."""
    for _ in range(warmup):
        for c in contenders:
            run(c)
    _sync(device)
    times = {c.name: {"wall": [], "cpu": []} for c in contenders}
    for _ in range(rounds):
        for c in contenders:
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            run(c)
            _sync(device)
            times[c.name]["wall"].append(time.perf_counter() - w0)
            times[c.name]["cpu"].append(time.process_time() - c0)
    return times


def peak_memory(fn: Callable[[], object], device: torch.device) -> float:
    """Peak bytes allocated during ``fn()`` above what was allocated before it (see module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return float(peak)


class PhaseTimer:
    """Time of the phases of one training step, from forward hooks on the backbone and the head.

    ``loss`` is the rest of the forward: anchors, assignment and the losses; torchvision's
    ``transform`` counts as ``prep``. On CPU the clock is this process's CPU time (robust on a
    shared machine); on CUDA it is wall time with a synchronisation at every boundary, so the
    breakdown runs apart from the timed rounds.
    """

    def __init__(self, c: Contender, device: torch.device):
        self.c, self.device, self.marks = c, device, {}
        self.clock = time.perf_counter if device.type == "cuda" else time.process_time
        self.handles = []
        modules = [("backbone", c.backbone), ("head", c.head)]
        if getattr(c.model, "transform", None) is not None:
            modules.append(("transform", c.model.transform))
        for name, module in modules:
            self.handles.append(module.register_forward_pre_hook(partial(self._mark, f"{name}_start")))
            self.handles.append(module.register_forward_hook(partial(self._mark, f"{name}_end")))

    def _mark(self, key: str, *_) -> None:
        _sync(self.device)
        self.marks[key] = self.clock()

    def _now(self) -> float:
        _sync(self.device)
        return self.clock()

    def _forward_split(self, t0: float, t_prep: float, t_fwd: float) -> tuple[float, float, float, float]:
        """-> prep (ours or torchvision's transform), backbone + FPN, head, rest of the forward."""
        m = self.marks
        transform = m["transform_end"] - m["transform_start"] if "transform_start" in m else 0.0
        backbone = m["backbone_end"] - m["backbone_start"]
        head = m["head_end"] - m["head_start"]
        return t_prep - t0 + transform, backbone, head, t_fwd - t_prep - transform - backbone - head

    def step(self, images: Tensor) -> dict[str, float]:
        """One training step -> seconds per phase of :data:`PHASES`."""
        c = self.c
        self.marks.clear()
        t0 = self._now()
        c.optimizer.zero_grad(set_to_none=True)
        x = c.prep(images)
        t_prep = self._now()
        losses = c.train_forward(x)
        loss = sum(losses.values())
        t_fwd = self._now()
        loss.backward()
        t_bwd = self._now()
        c.optimizer.step()
        t_opt = self._now()
        prep, backbone, head, rest = self._forward_split(t0, t_prep, t_fwd)
        return {"prep": prep, "backbone_fpn": backbone, "head": head, "loss": rest,
                "backward": t_bwd - t_fwd, "optimizer": t_opt - t_bwd}

    @torch.inference_mode()
    def infer_step(self, images: Tensor) -> dict[str, float]:
        """One inference batch (eval mode) -> seconds per phase of :data:`INFER_PHASES`; ``post`` is
        anchors, decoding, thresholds, per-level top-k and NMS (and torchvision's box rescale)."""
        c = self.c
        self.marks.clear()
        t0 = self._now()
        x = c.prep(images)
        t_prep = self._now()
        c.infer(x)
        t_end = self._now()
        prep, backbone, head, rest = self._forward_split(t0, t_prep, t_end)
        return {"prep": prep, "backbone_fpn": backbone, "head": head, "post": rest}

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def phase_breakdown(contenders: list[Contender], images: Tensor, steps: int, device: torch.device,
                    inference: bool = False) -> dict[str, dict[str, float]]:
    """Median seconds per phase of a training step (or, with ``inference``, of an inference batch
    in the contenders' current mode), per contender, interleaved."""
    timers = [PhaseTimer(c, device) for c in contenders]
    samples: dict[str, list[dict]] = {c.name: [] for c in contenders}
    try:
        for _ in range(steps):
            for t in timers:
                samples[t.c.name].append(t.infer_step(images) if inference else t.step(images))
    finally:
        for t in timers:
            t.close()
    phases = INFER_PHASES if inference else PHASES
    return {name: {p: statistics.median(s[p] for s in rows) for p in phases} for name, rows in samples.items()}


def profile_step(c: Contender, images: Tensor, device: torch.device, top: int = 30) -> str:
    """torch.profiler table of one training step of ``c``: the ops by self time, plus one row per
    phase (``step/forward+loss``, ``step/backward``, ``step/optimizer``) for their totals."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    c.train_step(images)
    with profile(activities=activities) as prof:
        c.optimizer.zero_grad(set_to_none=True)
        with record_function("step/forward+loss"):
            loss = sum(c.train_forward(c.prep(images)).values())
        with record_function("step/backward"):
            loss.backward()
        with record_function("step/optimizer"):
            c.optimizer.step()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _mb(x: float) -> float:
    return x / 2 ** 20


def _iqr(xs: list[float]) -> float:
    if len(xs) < 4:
        return max(xs) - min(xs)
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def bench_backbone(backbone: str, args, images: Tensor, targets: list[dict], device: torch.device) -> dict:
    contenders = build_contenders(backbone, args, images, targets, device)
    images = images.to(device)
    batch = images.shape[0]
    say = partial(print, file=sys.stderr, flush=True)
    say(f"[{backbone}] training: {args.warmup} warm-up + {args.rounds} timed rounds x {len(contenders)} models")
    train = time_alternating(contenders, lambda c: c.train_step(images), args.warmup, args.rounds, device)
    for c in contenders:
        c.model.eval()
    say(f"[{backbone}] inference: {args.warmup} warm-up + {args.rounds} timed rounds")
    infer = time_alternating(contenders, lambda c: c.infer_batch(images), args.warmup, args.rounds, device)
    dets = {c.name: c.infer_batch(images) / batch for c in contenders}
    say(f"[{backbone}] peak memory")
    mem_infer = {c.name: peak_memory(lambda: c.infer_batch(images), device) for c in contenders}
    infer_phases = {}
    if args.breakdown_steps:
        say(f"[{backbone}] inference phase breakdown ({args.breakdown_steps} batches each)")
        infer_phases = phase_breakdown(contenders, images, args.breakdown_steps, device, inference=True)
    mem_train = {}
    for c in contenders:
        c.model.train()
        c.optimizer.zero_grad(set_to_none=True)  # last step's gradients are not part of this one
        mem_train[c.name] = peak_memory(lambda: c.train_step(images), device)
    phases = {}
    if args.breakdown_steps:
        say(f"[{backbone}] training phase breakdown ({args.breakdown_steps} steps each)")
        phases = phase_breakdown(contenders, images, args.breakdown_steps, device)
    profile = profile_step(contenders[0], images, device) if args.profile else None

    ref = contenders[0].name
    med = {kind: {n: {k: statistics.median(v) for k, v in d.items()} for n, d in times.items()}
           for kind, times in (("train", train), ("infer", infer))}
    rows = []
    for c in contenders:
        n = c.name
        tr, inf = med["train"][n], med["infer"][n]
        rows.append({
            "model": n, "params_M": sum(p.numel() for p in c.model.parameters()) / 1e6,
            "train_step_s": tr["wall"], "train_step_iqr_s": _iqr(train[n]["wall"]), "train_step_cpu_s": tr["cpu"],
            "train_ratio": med["train"][ref]["wall"] / tr["wall"],
            "train_ratio_cpu": med["train"][ref]["cpu"] / tr["cpu"],
            "train_peak_MB": _mb(mem_train[n]),
            "infer_img_per_s": batch / inf["wall"], "infer_img_per_cpu_s": batch / inf["cpu"],
            "infer_ratio": med["infer"][ref]["wall"] / inf["wall"],
            "infer_ratio_cpu": med["infer"][ref]["cpu"] / inf["cpu"],
            "infer_peak_MB": _mb(mem_infer[n]), "dets_per_img": dets[n], "phases_s": phases.get(n), "infer_phases_s": infer_phases.get(n),
            "train_times": train[n], "infer_times": infer[n]})
    return {"backbone": backbone, "rows": rows, "profile": profile}


def format_tables(results: list[dict], setup: dict) -> str:
    m = setup["machine"]
    cpu_cols = setup["device"] == "cpu"
    ref = results[0]["rows"][0]["model"].split(" ")[0] if results else "ATSS"
    lines = [f"Machine: {m['cpu']} ({m['cpus']} cores), torch {m['torch']} with {m['threads']} threads, "
             f"torchvision {m['torchvision']}, device {m.get('gpu') or setup['device']}",
             f"Inputs: {setup['batch']} images of {setup['height']}x{setup['width']}, {setup['num_gts']} boxes each, "
             f"{setup['num_classes']} classes, fp32; {setup['warmup']} warm-up + {setup['rounds']} alternating "
             f"rounds, medians; classifier prior {setup['cls_prior']}. Ratios: {ref} time / this model's time "
             f"(< 1: {ref} is faster).", ""]
    head = ["backbone", "model", "params (M)", "train step (s)"]
    head += ["train CPU (s)"] if cpu_cols else []
    head += [f"{ref} / this"] + ([f"{ref} / this (CPU)"] if cpu_cols else [])
    head += ["train peak (MB)", "infer (img/s)"] + (["infer (img/CPU-s)"] if cpu_cols else [])
    head += [f"{ref} / this"] + ([f"{ref} / this (CPU)"] if cpu_cols else [])
    head += ["infer peak (MB)", "dets/img"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        for r in res["rows"]:
            cells = [res["backbone"], r["model"], f"{r['params_M']:.1f}",
                     f"{r['train_step_s']:.3f} ±{r['train_step_iqr_s'] / 2:.3f}"]
            cells += [f"{r['train_step_cpu_s']:.3f}"] if cpu_cols else []
            cells += [f"{r['train_ratio']:.2f}"] + ([f"{r['train_ratio_cpu']:.2f}"] if cpu_cols else [])
            cells += [f"{r['train_peak_MB']:.0f}", f"{r['infer_img_per_s']:.2f}"]
            cells += [f"{r['infer_img_per_cpu_s']:.2f}"] if cpu_cols else []
            cells += [f"{r['infer_ratio']:.2f}"] + ([f"{r['infer_ratio_cpu']:.2f}"] if cpu_cols else [])
            cells += [f"{r['infer_peak_MB']:.0f}", f"{r['dets_per_img']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
    clock = "CPU time" if cpu_cols else "wall time, synchronised"
    lines += _phase_table(results, "phases_s", PHASES,
                          f"Training step by phase (median ms, {clock}; prep = normalisation or torchvision's "
                          "transform, loss = anchors + assignment + losses):")
    lines += _phase_table(results, "infer_phases_s", INFER_PHASES,
                          f"Inference batch by phase (median ms, {clock}; post = anchors, decoding, thresholds, "
                          "per-level top-k, NMS):")
    return "\n".join(lines)


def _phase_table(results: list[dict], key: str, phases: tuple, title: str) -> list[str]:
    """Markdown rows of the per-phase medians ``row[key]`` (seconds), or nothing when none were taken."""
    if not any(r[key] for res in results for r in res["rows"]):
        return []
    lines = ["", title, "", "| backbone | model | " + " | ".join(phases) + " | total |",
             "|---|---|" + "---|" * (len(phases) + 1)]
    for res in results:
        for r in res["rows"]:
            if r[key]:
                ph = r[key]
                lines.append(f"| {res['backbone']} | {r['model']} | "
                             + " | ".join(f"{1000 * ph[p]:.0f}" for p in phases)
                             + f" | {1000 * sum(ph.values()):.0f} |")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="GPU size: 4 images of 800x1344, 10 warm-up, 30 rounds")
    p.add_argument("--backbones", default="resnet18,resnet50")
    p.add_argument("--models", default="atss,tv_fcos,tv_retinanet",
                   help="comma list, ours first: atss, fcos (our FCOS preset), tv_fcos, tv_retinanet")
    p.add_argument("--batch", type=int)
    p.add_argument("--size", help="HxW, multiples of 32 (default 320x320; --full 800x1344)")
    p.add_argument("--num-gts", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--warmup", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--breakdown-steps", type=int, help="phase breakdown steps per model (0: skip)")
    p.add_argument("--cls-prior", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--device", help="cpu / cuda (default: cuda with --full when available)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of our ATSS step")
    p.add_argument("--json", action="store_true", help="print all figures as JSON on the last line")
    args = p.parse_args(argv)
    full = args.full
    args.batch = args.batch or (4 if full else 2)
    args.size = args.size or ("800x1344" if full else "320x320")
    try:
        args.height, args.width = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        p.error(f"--size must be HxW, got {args.size!r}")
    if args.height % 32 or args.width % 32:
        p.error(f"--size {args.size}: both sides must be multiples of 32 (no model should pad)")
    args.warmup = args.warmup if args.warmup is not None else (10 if full else 2)
    args.rounds = args.rounds or (30 if full else 5)
    args.breakdown_steps = args.breakdown_steps if args.breakdown_steps is not None else (10 if full else 2)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    known = {"atss", "fcos", "tv_fcos", "tv_retinanet"}
    if unknown := [m for m in args.models if m not in known]:
        p.error(f"--models: unknown {unknown}; choose from {sorted(known)}")
    if not args.models or args.models[0] not in ("atss", "fcos"):
        p.error("--models must start with one of ours (atss or fcos): the ratios are relative to it")
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if bad := [b for b in args.backbones if b not in BACKBONES]:
        p.error(f"--backbones: unknown {bad}; choose from {list(BACKBONES)}")
    if not 0 < args.cls_prior < 1:
        p.error("--cls-prior must be in (0, 1)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if args.full and torch.cuda.is_available() else "cpu"))
    images, targets = make_inputs(args.batch, args.height, args.width, args.num_gts, args.num_classes)
    setup = {"machine": machine_info(device), "device": str(device), "batch": args.batch, "height": args.height,
             "width": args.width, "num_gts": args.num_gts, "num_classes": args.num_classes, "warmup": args.warmup,
             "rounds": args.rounds, "cls_prior": args.cls_prior}
    t0 = time.perf_counter()
    results = [bench_backbone(b, args, images, targets, device) for b in args.backbones]
    print(format_tables(results, setup))
    for res in results:
        if res["profile"]:
            print(f"\ntorch.profiler, one training step of {res['rows'][0]['model']} ({res['backbone']}):\n"
                  f"{res['profile']}")
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    out = {"setup": setup, "results": [{k: v for k, v in r.items() if k != "profile"} for r in results]}
    if args.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
