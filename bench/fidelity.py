"""What the remaining differences from the official ATSS code change, measured on real COCO boxes.

    .venv/bin/python bench/fidelity.py                     # coco_tiny, train + val, 800/1333
    .venv/bin/python bench/fidelity.py --json              # the figures as JSON too
    .venv/bin/python bench/fidelity.py --data DIR          # another slice (DIR/annotations/instances_*.json)

Each section runs our rule and the official rule side by side on the same boxes, everything else
equal, and prints what moves. The official rules are written here as transformations of the inputs
of our own assigner and losses, so that the one rule under test is the only thing that differs:

1. Coordinates: our continuous ``[x, y, x + w, y + h]`` against the official "+1" convention
   (``x2 = x + w - 1``, clipped to ``W - 1``, x2 scaled by the resize ratio as is, IoU and box
   sizes with ``+1``, anchor ``[c - (s-1)/2, c + (s-1)/2]``). Official IoUs equal continuous IoUs of
   the boxes grown by 1 px to the right and bottom; official centres then sit 0.5 px before those
   boxes' midpoints, which makes the official 0.01 px centre margin 0.51 px (that this is the
   official assignment is checked against a "+1" transcription in tests/test_assign_atss.py).
   Reported: positives,
   anchors assigned differently, GTs without a positive, and per size bin the ratio
   official / ours of the GIoU loss (prediction = the anchor, as at the start of training; and a
   prediction 1 px off the GT on both axes) and of the centerness target, on the positives both
   conventions share.
2. Ties in centre distance: our lower-index rule against the opposite one (official
   ``torch.topk`` leaves the order of ties to the implementation): anchors assigned differently.
3. Resize rounding: our ``round(side * scale)`` against the official ``int()`` of the long side:
   images whose size changes, and what our assignment does at the official sizes.
4. Backbone DCN stride: torchvision's bottleneck strides its 3x3 conv (the DCN in stages c3-c5),
   the official MSRA ResNet its first 1x1 conv. Counted on R-50 with DCN in c3-c5: multiply-adds
   of the body with the stride in either place, and the image-space step of one unit of offset.
5. Anchor shapes before the fix (area-preserving ``size / sqrt(r) x size * sqrt(r)``) against the
   official whole-pixel rule now in :func:`detector.anchors.cell_anchors`, for the non-square rows
   of Tables 6 and 7: positives and anchors assigned differently (a difference that no longer exists).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detector.anchors import AnchorGenerator  # noqa: E402
from detector.assigners import ATSSAssigner, BACKGROUND  # noqa: E402
from detector.backbone import ModulatedDeformConv2d, ResNetBody  # noqa: E402
from detector.config import STRIDES  # noqa: E402
from detector.losses import centerness_targets, giou_loss  # noqa: E402
from pipeline.data.annotations import load_coco_json  # noqa: E402
from pipeline.data.transforms import get_resize_size  # noqa: E402

SIZE_DIVISIBLE = 32
# GT side sqrt(w * h) in resized pixels: [lo, hi).
SIZE_BINS = ((0, 8), (8, 16), (16, 32), (32, 64), (64, 128), (128, math.inf))
SQUARE_SIDES = (4, 8, 16, 32, 64, 128)


@dataclass
class Image:
    """One image's non-crowd GTs, both conventions, in the resized image's pixels.

    ours float[G, 4] continuous xyxy; official float[G', 4] official "+1" xyxy; ours_ids / official_ids
    int64 annotation ids of those rows (the conventions drop different degenerate boxes)."""

    size: tuple[int, int]
    official_size: tuple[int, int]
    ours_at_official_size: torch.Tensor
    ours: torch.Tensor
    ours_ids: torch.Tensor
    official: torch.Tensor
    official_ids: torch.Tensor


def official_resize_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """maskrcnn-benchmark ``Resize.get_size``: the short side rounded, the long side truncated."""
    lo, hi = float(min(height, width)), float(max(height, width))
    size = min_size
    if hi / lo * size > max_size:
        size = int(round(max_size * lo / hi))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def load_images(data: Path, min_size: int, max_size: int) -> tuple[list[Image], int]:
    """Every image of ``data/annotations/instances_*.json`` -> (images, resize sizes that differ)."""
    images, size_diffs = [], 0
    files = sorted((data / "annotations").glob("instances_*.json"))
    if not files:
        raise SystemExit(f"--data {data}: no annotations/instances_*.json there")
    for path in files:
        table, _ = load_coco_json(path)
        for i in range(table.num_images):
            h0, w0 = int(table.heights[i]), int(table.widths[i])
            sl = table.box_slice(i)
            keep = ~table.iscrowd[sl]
            xyxy = table.boxes[sl][keep].astype(np.float64)
            ids = torch.as_tensor(table.ann_ids[sl][keep])
            nh, nw, _ = get_resize_size(h0, w0, min_size, max_size)
            size_diffs += (nh, nw) != official_resize_size(h0, w0, min_size, max_size)
            ratio = np.array([nw / w0, nh / h0, nw / w0, nh / h0])
            # Ours (pipeline.data): clip to [0, W] x [0, H], drop boxes under 1 px, scale.
            ours = np.clip(xyxy, 0, [w0, h0, w0, h0])
            ok = (ours[:, 2] - ours[:, 0] >= 1) & (ours[:, 3] - ours[:, 1] >= 1)
            # Official: x2 = x + w - 1, clip to [0, W - 1], drop x2 <= x1 or y2 <= y1, scale every coordinate.
            off = xyxy.copy()
            off[:, 2:] -= 1
            off = np.clip(off, 0, [w0 - 1, h0 - 1, w0 - 1, h0 - 1])
            ok_off = (off[:, 2] > off[:, 0]) & (off[:, 3] > off[:, 1])
            oh, ow = official_resize_size(h0, w0, min_size, max_size)
            ratio_off = np.array([ow / w0, oh / h0, ow / w0, oh / h0])
            images.append(Image((nh, nw), (oh, ow), torch.tensor(ours[ok] * ratio_off, dtype=torch.float32),
                                torch.tensor(ours[ok] * ratio, dtype=torch.float32), ids[ok],
                                torch.tensor(off[ok_off] * ratio, dtype=torch.float32), ids[ok_off]))
    return images, size_diffs


def anchors_for(size: tuple[int, int], generator: AnchorGenerator):
    h, w = (-(-s // SIZE_DIVISIBLE) * SIZE_DIVISIBLE for s in size)
    return generator([(-(-h // s), -(-w // s)) for s in STRIDES], torch.device("cpu"))


def assign(assigner: ATSSAssigner, anchor_set, boxes: torch.Tensor) -> torch.Tensor:
    return assigner(anchor_set, boxes[None], torch.ones(1, boxes.shape[0], dtype=torch.bool))[0]


def by_annotation(matched: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """GT-row assignment -> annotation-id assignment (-1 stays background)."""
    return torch.where(matched >= 0, ids[matched.clamp(min=0)], torch.full_like(matched, BACKGROUND))


def flipped_levels(anchor_set) -> torch.Tensor:
    """Permutation that reverses the anchor order inside each level (ties then go the other way)."""
    perm, start = [], 0
    for n in anchor_set.num_per_level:
        perm.append(torch.arange(start + n - 1, start - 1, -1))
        start += n
    return torch.cat(perm)


def median_ratios(ratio: torch.Tensor, side: torch.Tensor) -> list[dict]:
    rows = []
    for lo, hi in SIZE_BINS:
        sel = (side >= lo) & (side < hi)
        if sel.any():
            rows.append({"bin": f"{lo}-{hi}" if hi < math.inf else f">={lo}", "n": int(sel.sum()),
                         "median": float(ratio[sel].median()), "max": float(ratio[sel].max())})
    return rows


def measure(images: list[Image]) -> dict:
    generator = AnchorGenerator(STRIDES, 8.0, 1, (1.0,))  # the paper's ATSS anchors (8S, square)
    ours_assigner = ATSSAssigner(topk=9)
    official_assigner = ATSSAssigner(topk=9, center_margin=0.51)
    totals = dict(gts_ours=0, gts_official=0, pos_ours=0, pos_official=0, moved=0, only_ours=0, only_official=0,
                  other_gt=0, no_pos_ours=0, no_pos_official=0, tie_moved=0, resize_pos=0, resize_moved=0)
    giou_anchor, giou_shift, ctr, sides = [], [], [], []
    for im in images:
        anchor_set = anchors_for(im.size, generator)
        ours = assign(ours_assigner, anchor_set, im.ours)
        # Official IoUs = continuous IoUs of every box grown 1 px right and bottom (see the docstring).
        grown = torch.tensor([0.0, 0.0, 1.0, 1.0])
        off_set = type(anchor_set)(anchor_set.anchors + 0.5, anchor_set.strides, anchor_set.levels,
                                   anchor_set.num_per_level)
        official = assign(official_assigner, off_set, im.official + grown)
        a_ours, a_off = by_annotation(ours, im.ours_ids), by_annotation(official, im.official_ids)
        totals["gts_ours"] += im.ours.shape[0]
        totals["gts_official"] += im.official.shape[0]
        totals["pos_ours"] += int((ours >= 0).sum())
        totals["pos_official"] += int((official >= 0).sum())
        totals["moved"] += int((a_ours != a_off).sum())
        totals["only_ours"] += int(((a_ours >= 0) & (a_off < 0)).sum())
        totals["only_official"] += int(((a_ours < 0) & (a_off >= 0)).sum())
        totals["other_gt"] += int(((a_ours >= 0) & (a_off >= 0) & (a_ours != a_off)).sum())
        totals["no_pos_ours"] += int((torch.bincount(ours[ours >= 0], minlength=im.ours.shape[0]) == 0).sum())
        totals["no_pos_official"] += int(
            (torch.bincount(official[official >= 0], minlength=im.official.shape[0]) == 0).sum())
        # Ties in centre distance the other way round: reverse each level, assign, undo.
        perm = flipped_levels(anchor_set)
        rev_set = type(anchor_set)(anchor_set.anchors[perm], anchor_set.strides[perm], anchor_set.levels[perm],
                                   anchor_set.num_per_level)
        rev = torch.empty_like(ours)
        rev[perm] = assign(ours_assigner, rev_set, im.ours)
        totals["tie_moved"] += int((rev != ours).sum())
        # Our convention at the official image size (anchors of that size; compared per anchor where
        # the padded sizes, hence the anchor sets, coincide - otherwise every positive counts as moved).
        set_off_size = anchors_for(im.official_size, generator)
        at_off_size = assign(ours_assigner, set_off_size, im.ours_at_official_size)
        totals["resize_pos"] += int((at_off_size >= 0).sum())
        if set_off_size.anchors.shape == anchor_set.anchors.shape:
            totals["resize_moved"] += int((by_annotation(at_off_size, im.ours_ids) != a_ours).sum())
        else:
            totals["resize_moved"] += int((ours >= 0).sum()) + int((at_off_size >= 0).sum())
        # Losses and targets on the positives both conventions give the same annotation.
        shared = (a_ours >= 0) & (a_ours == a_off)
        if shared.any():
            idx = shared.nonzero().squeeze(1)
            g_ours = im.ours[ours[idx]]
            g_off = im.official[official[idx]]
            a_cont = anchor_set.anchors[idx]
            # Official anchor coordinates: the same centre, (s - 1) / 2 on each side.
            a_off_coords = a_cont + torch.tensor([0.5, 0.5, -0.5, -0.5])
            centre = (a_cont[:, :2] + a_cont[:, 2:]) / 2
            giou_anchor.append(giou_loss(a_off_coords, g_off) / giou_loss(a_cont, g_ours))
            giou_shift.append(giou_loss(g_off + 1, g_off) / giou_loss(g_ours + 1, g_ours))
            ctr.append(centerness_targets(centre, g_off) / centerness_targets(centre, g_ours))
            sides.append(((g_ours[:, 2] - g_ours[:, 0]) * (g_ours[:, 3] - g_ours[:, 1])).sqrt())
    side = torch.cat(sides)
    totals["moved_fraction_of_official_pos"] = totals["moved"] / max(totals["pos_official"], 1)
    totals["tie_moved_fraction_of_pos"] = totals["tie_moved"] / max(totals["pos_ours"], 1)
    totals["giou_loss_ratio_pred_anchor"] = median_ratios(torch.cat(giou_anchor), side)
    totals["giou_loss_ratio_pred_1px_off"] = median_ratios(torch.cat(giou_shift), side)
    # Square GTs of side s and a prediction 1 px off on both axes (official box: side s - 1).
    sq = torch.tensor([[0.0, 0.0, float(s), float(s)] for s in SQUARE_SIDES])
    sq_off = sq - torch.tensor([0.0, 0.0, 1.0, 1.0])
    totals["giou_loss_ratio_square_1px_off"] = dict(zip(SQUARE_SIDES, (giou_loss(sq_off + 1, sq_off)
                                                                        / giou_loss(sq + 1, sq)).tolist()))
    totals["centerness_target_ratio"] = median_ratios(torch.cat(ctr), side)
    return totals


def area_preserving_cells(generator: AnchorGenerator, anchor_scale: float, scales_per_octave: int,
                          ratios: tuple[float, ...]) -> None:
    """Replace ``generator``'s shapes by the former rule (sides ``size / sqrt(r)``, ``size * sqrt(r)``)."""
    for lvl, stride in enumerate(generator.strides):
        rows = []
        for r in ratios:
            for i in range(scales_per_octave):
                size = anchor_scale * stride * 2.0 ** (i / scales_per_octave)
                hw, hh = round(size / math.sqrt(r) * 8) / 16, round(size * math.sqrt(r) * 8) / 16
                rows.append([-hw, -hh, hw, hh])
        generator.cells[lvl] = torch.tensor(rows)


ANCHOR_ROWS = (("Table 6, 1:2", 8.0, 1, (0.5,)), ("Table 6, 2:1", 8.0, 1, (2.0,)),
               ("Table 6, 1:4", 8.0, 1, (0.25,)), ("Table 7, #sc=3 #ar=3", 4.0, 3, (0.5, 1.0, 2.0)))


def anchor_rule_effect(images: list[Image]) -> list[dict]:
    rows = []
    for label, scale, spo, ratios in ANCHOR_ROWS:
        official, former = AnchorGenerator(STRIDES, scale, spo, ratios), AnchorGenerator(STRIDES, scale, spo, ratios)
        area_preserving_cells(former, scale, spo, ratios)
        assigner = ATSSAssigner(topk=9, anchors_per_location=len(ratios) * spo)
        pos_new = pos_old = moved = 0
        for im in images:
            new = assign(assigner, anchors_for(im.size, official), im.ours)
            old = assign(assigner, anchors_for(im.size, former), im.ours)
            pos_new += int((new >= 0).sum())
            pos_old += int((old >= 0).sum())
            moved += int((new != old).sum())
        rows.append({"config": label, "pos_official_rule": pos_new, "pos_former_rule": pos_old, "moved": moved,
                     "moved_fraction": moved / max(pos_new, 1)})
    return rows


def body_macs(official_stride: bool, size: int = 256) -> int:
    """Multiply-adds of one R-50 body forward (DCN c3-c5, offsets included) on a ``size``-px square."""
    body = ResNetBody("resnet50", dcn_stages=(3, 4, 5)).eval()
    if official_stride:  # stride on the first 1x1 of each downsampling block, the DCN at stride 1
        for layer in (body.layer2, body.layer3, body.layer4):
            block = layer[0]
            block.conv1.stride, block.conv2.stride, block.conv2.offset_mask.stride = (2, 2), 1, (1, 1)
    macs = []

    def count(module, _inputs, output):
        macs.append(output.shape[-2] * output.shape[-1] * module.weight.numel())

    for m in body.modules():
        if isinstance(m, (torch.nn.Conv2d, ModulatedDeformConv2d)):
            m.register_forward_hook(count)
    with torch.no_grad():
        body(torch.zeros(1, 3, size, size))
    return sum(macs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "coco_tiny",
                        help="a COCO slice with annotations/instances_*.json (default: ../shared/data/coco_tiny)")
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    images, size_diffs = load_images(args.data, args.min_size, args.max_size)
    r = measure(images)
    print(f"{args.data}: {len(images)} images at {args.min_size}/{args.max_size}, ATSS k=9, 8S square anchors")
    print(f"\n1. Coordinates, ours (no +1) vs official (+1)")
    print(f"   GTs kept:              {r['gts_ours']} vs {r['gts_official']}")
    print(f"   positive anchors:      {r['pos_ours']} vs {r['pos_official']}")
    print(f"   GTs without positive:  {r['no_pos_ours']} vs {r['no_pos_official']}")
    print(f"   anchors assigned differently: {r['moved']} "
          f"({100 * r['moved_fraction_of_official_pos']:.1f}% of the official positives): positive only in ours "
          f"{r['only_ours']}, only in the official {r['only_official']}, another GT {r['other_gt']}")
    print("   GIoU loss official/ours, square GT of side s, prediction 1 px off: "
          + "; ".join(f"{s} px x{v:.3f}" for s, v in r["giou_loss_ratio_square_1px_off"].items()))
    for key, title in [("giou_loss_ratio_pred_anchor", "GIoU loss official/ours, prediction = anchor"),
                       ("giou_loss_ratio_pred_1px_off", "GIoU loss official/ours, prediction 1 px off"),
                       ("centerness_target_ratio", "centerness target official/ours")]:
        print(f"   {title} (median, max; by GT side px):")
        print("     " + "; ".join(f"{b['bin']}: x{b['median']:.3f}, x{b['max']:.3f} (n={b['n']})" for b in r[key]))
    print(f"\n2. Centre-distance ties to the higher index instead of the lower: {r['tie_moved']} anchors "
          f"assigned differently ({100 * r['tie_moved_fraction_of_pos']:.2f}% of our positives)")
    print(f"\n3. Resize: {size_diffs} of {len(images)} images get a different size under the official "
          f"int() of the long side (at most 1 px); our convention at those sizes: {r['resize_pos']} positives "
          f"(vs {r['pos_ours']}), {r['resize_moved']} anchors assigned differently")
    ours_macs, official_macs = body_macs(False), body_macs(True)
    print(f"\n4. R-50 body with DCN c3-c5, stride in the 3x3/DCN (ours, torchvision) vs in the 1x1 (official): "
          f"x{ours_macs / official_macs:.3f} multiply-adds; the DCN's offsets are in units of its input grid, "
          f"so one unit moves a tap by 4 / 8 / 16 image px in c3 / c4 / c5's first block (official: 8 / 16 / 32)")
    r["body_macs_ratio_stride_in_3x3"] = ours_macs / official_macs
    r["anchor_rule"] = anchor_rule_effect(images)
    print("\n5. Anchor shapes, official whole-pixel rule vs the former area-preserving one (ATSS k=9):")
    for row in r["anchor_rule"]:
        print(f"   {row['config']}: {row['pos_official_rule']} vs {row['pos_former_rule']} positives, "
              f"{row['moved']} anchors assigned differently ({100 * row['moved_fraction']:.1f}%)")
    if args.json:
        print(json.dumps({**r, "images": len(images), "resize_size_differs": size_diffs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
