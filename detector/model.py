"""The detector: backbone + FPN + ATSS head, assignment, losses and post-processing.

One module serves every configuration of the paper (RetinaNet, FCOS, ATSS and the steps between);
see :class:`detector.config.DetectorConfig`. The API follows torchvision's detection models.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import assigners
from .anchors import AnchorGenerator, AnchorSet
from .backbone import BackboneFPN, ResNetBody
from .box_coder import DeltaBoxCoder, PointCoder
from .config import NUM_LEVELS, DetectorConfig, get_preset
from .head import ATSSHead, flatten_level_outputs
from .losses import (centerness_loss, centerness_targets, classification_loss, reduce_mean_counts,
                     regression_loss)
from .postprocess import postprocess_image, rescale_boxes

SIZE_DIVISIBLE = 32
# torchvision's ImageNet weights (ResNet50_Weights.IMAGENET1K_V1 etc.) expect these, RGB in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ATSSDetector(nn.Module):
    """Dense single-stage detector configured by a :class:`DetectorConfig`.

    ``forward(images, targets=None, image_sizes=None, original_sizes=None)``:

    - ``images``: [B, 3, H, W] (padded) or a list of [3, h, w] (padded here on the bottom/right
      to a multiple of 32), RGB, in one of two formats told apart by dtype:

      - uint8: raw pixels 0..255, as :mod:`pipeline.data` yields them. The model normalises them
        on its own device with the ImageNet ``pixel_mean``/``pixel_std`` buffers and sets the
        padding outside each image's valid region (``image_sizes``, or each list item's size) to
        0, the mean colour, so the host never does float work or ships 4x the bytes.
      - floating point: already normalised ((x/255 - IMAGENET_MEAN) / IMAGENET_STD, padding 0),
        used as given. A float image in 0..255 must be converted with ``.round().to(torch.uint8)``
        or passed through :meth:`normalize` first.
    - ``targets`` (training): list of dicts with ``boxes`` float[G, 4] xyxy in input pixels,
      ``labels`` int64[G] in 1..num_classes, optional ``crowd_boxes`` float[K, 4].
    - ``image_sizes``: list of (h, w), the valid region of each image (default: its tensor size).
    - ``original_sizes``: list of (h0, w0); eval boxes are rescaled to them (default: input pixels).

    Training mode returns ``{"loss_cls", "loss_reg", "loss_centerness"}`` (0-d tensors whose sum
    is the total loss) and sets :attr:`assign_stats`; eval mode returns one dict per image with
    ``boxes`` float[D, 4] xyxy, ``scores`` float[D], ``labels`` int64[D].
    """

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        body = ResNetBody(cfg.backbone, frozen_bn=cfg.frozen_bn, frozen_stages=cfg.frozen_stages,
                          dcn_stages=cfg.dcn_stages, pretrained_path=cfg.pretrained_path)
        self.backbone = BackboneFPN(body, cfg.fpn_channels)
        self.head = ATSSHead(in_channels=cfg.fpn_channels, num_classes=cfg.num_classes,
                             anchors_per_location=cfg.anchors_per_location, channels=cfg.head_channels,
                             num_convs=cfg.num_convs, group_norm=cfg.group_norm, gn_groups=cfg.gn_groups,
                             scalar=cfg.scalar, centerness=cfg.centerness, regression=cfg.regression,
                             dcn_in_tower=cfg.dcn_in_tower, prior_prob=cfg.prior_prob, num_levels=NUM_LEVELS)
        self.anchor_generator = AnchorGenerator(cfg.strides, cfg.anchor_scale, cfg.scales_per_octave,
                                                cfg.aspect_ratios)
        self.box_coder = DeltaBoxCoder(cfg.bbox_reg_weights, cfg.delta_clamp)
        self.point_coder = PointCoder()
        self.assigner = assigners.build_assigner(cfg)
        self.assign_stats: dict[str, float] = {}
        # Non-persistent, as in detectron2: checkpoints stay the same and .to(device) moves them.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    def normalize(self, images: Tensor, image_sizes: Sequence[tuple[int, int]] | None = None) -> Tensor:
        """Pixels 0..255 ``[B, 3, H, W]`` (uint8 or float) -> normalised float32, 0 outside ``image_sizes``.

        The zero padding keeps batches bit-identical to normalising each image before padding it.
        """
        # The host keeps uint8 batches channels-last (no transpose on the CPU); the layout change
        # rides along with the dtype conversion here.
        pixels = images.to(self.pixel_mean.dtype, memory_format=torch.contiguous_format)
        out = (pixels - self.pixel_mean) / self.pixel_std
        if image_sizes is not None:
            hw = torch.as_tensor(image_sizes, device=images.device).view(-1, 2, 1)
            rows = torch.arange(out.shape[-2], device=images.device) < hw[:, 0]  # [B, H]
            cols = torch.arange(out.shape[-1], device=images.device) < hw[:, 1]  # [B, W]
            out = torch.where((rows[:, :, None] & cols[:, None, :])[:, None], out, out.new_zeros(()))
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor | Sequence[Tensor], targets: list[dict[str, Tensor]] | None = None,
                image_sizes: Sequence[tuple[int, int]] | None = None,
                original_sizes: Sequence[tuple[int, int]] | None = None):
        images, image_sizes = self._batch_images(images, image_sizes)
        if self.training and targets is None:
            raise ValueError("ATSSDetector in training mode needs targets (call model.eval() for inference)")
        if targets is not None and len(targets) != images.shape[0]:
            raise ValueError(f"got {len(targets)} targets for {images.shape[0]} images")
        if original_sizes is not None and len(original_sizes) != images.shape[0]:
            raise ValueError(f"got {len(original_sizes)} original_sizes for {images.shape[0]} images")

        features = self.backbone(images)
        cls_out, reg_out, ctr_out = self.head(features)
        anchors = self.anchor_generator([tuple(f.shape[-2:]) for f in features], images.device)
        cls = flatten_level_outputs(cls_out, self.cfg.num_classes)  # [B, N, C]
        reg = flatten_level_outputs(reg_out, 4)  # [B, N, 4]
        ctr = flatten_level_outputs(ctr_out, 1).squeeze(-1) if ctr_out is not None else None  # [B, N]

        if self.training:
            return self.compute_losses(cls, reg, ctr, anchors, targets)
        return self.postprocess(cls, reg, ctr, anchors, image_sizes, original_sizes)

    def _batch_images(self, images: Tensor | Sequence[Tensor],
                      image_sizes: Sequence[tuple[int, int]] | None) -> tuple[Tensor, list[tuple[int, int]]]:
        if isinstance(images, Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be [B, 3, H, W] or a list of [3, h, w] (uint8 or float), "
                                 f"got shape {tuple(images.shape)}")
            sizes = [tuple(images.shape[-2:])] * images.shape[0]
            batch = images
            valid = image_sizes
        else:
            images = list(images)
            if not images:
                raise ValueError("empty list of images")
            for i, im in enumerate(images):
                if im.dim() != 3 or im.shape[0] != 3:
                    raise ValueError(f"image {i} must be [3, h, w], got shape {tuple(im.shape)}")
                if (im.dtype == torch.uint8) != (images[0].dtype == torch.uint8):
                    raise ValueError(f"image {i} is {im.dtype} but image 0 is {images[0].dtype}: "
                                     f"a batch is either all uint8 pixels or all normalised floats")
            sizes = [tuple(im.shape[-2:]) for im in images]
            valid = sizes
            h = max(s[0] for s in sizes)
            w = max(s[1] for s in sizes)
            batch = images[0].new_zeros(len(images), 3, h, w)
            for i, im in enumerate(images):
                batch[i, :, : im.shape[1], : im.shape[2]] = im
        if image_sizes is not None:
            if len(image_sizes) != batch.shape[0]:
                raise ValueError(f"got {len(image_sizes)} image_sizes for {batch.shape[0]} images")
            sizes = [(int(s[0]), int(s[1])) for s in image_sizes]
        if batch.dtype == torch.uint8:
            batch = self.normalize(batch, valid)
        elif not batch.is_floating_point():
            raise ValueError(f"images must be uint8 pixels or normalised floats, got {batch.dtype}")
        h, w = batch.shape[-2:]
        ph = (-h) % SIZE_DIVISIBLE
        pw = (-w) % SIZE_DIVISIBLE
        if ph or pw:
            batch = F.pad(batch, (0, pw, 0, ph))
        return batch, [(int(s[0]), int(s[1])) for s in sizes]

    # ------------------------------------------------------------------ training
    def _pad_targets(self, targets: list[dict[str, Tensor]], device: torch.device,
                     key: str = "boxes") -> tuple[Tensor, Tensor, Tensor]:
        """-> boxes float[B, G, 4], labels int64[B, G] (0 in padding), valid bool[B, G]."""
        b = len(targets)
        boxes_list, labels_list = [], []
        for i, t in enumerate(targets):
            boxes = t.get(key)
            if boxes is None:
                if key == "boxes":
                    raise ValueError(f"target {i} has no 'boxes'")
                boxes = torch.zeros(0, 4)
            boxes = torch.as_tensor(boxes, dtype=torch.float32, device=device)
            if boxes.numel() == 0:
                boxes = boxes.reshape(0, 4)  # accept [0], [0, 4], ... for an image without boxes
            if boxes.dim() != 2 or boxes.shape[1] != 4:
                raise ValueError(f"target {i} '{key}' must be float[G, 4] xyxy, got shape {tuple(boxes.shape)}")
            if not torch.isfinite(boxes).all():
                raise ValueError(f"target {i} '{key}' has non-finite coordinates")
            bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
            if bad.any():
                j = int(bad.nonzero()[0, 0])
                raise ValueError(f"target {i} '{key}'[{j}] = {boxes[j].tolist()} is degenerate "
                                 f"(needs x2 > x1 and y2 > y1, xyxy pixels)")
            if key == "boxes":
                labels = torch.as_tensor(t.get("labels", torch.zeros(0)), device=device).reshape(-1)
                if labels.shape[0] != boxes.shape[0]:
                    raise ValueError(f"target {i} has {boxes.shape[0]} boxes but {labels.shape[0]} labels")
                if labels.is_floating_point():
                    raise ValueError(f"target {i} 'labels' must be integers, got {labels.dtype}")
                labels = labels.long()
                if labels.numel() and (labels.min() < 1 or labels.max() > self.cfg.num_classes):
                    raise ValueError(f"target {i} 'labels' must be in 1..{self.cfg.num_classes}, "
                                     f"got values in [{int(labels.min())}, {int(labels.max())}]")
            else:
                labels = torch.zeros(boxes.shape[0], dtype=torch.long, device=device)
            boxes_list.append(boxes)
            labels_list.append(labels)
        # At least one (invalid) row, so gathers by GT index stay legal when no image has a GT.
        g = max([1] + [x.shape[0] for x in boxes_list])
        boxes_pad = torch.zeros(b, g, 4, device=device)
        labels_pad = torch.zeros(b, g, dtype=torch.long, device=device)
        valid = torch.zeros(b, g, dtype=torch.bool, device=device)
        for i, (bx, lb) in enumerate(zip(boxes_list, labels_list)):
            boxes_pad[i, : bx.shape[0]] = bx
            labels_pad[i, : lb.shape[0]] = lb
            valid[i, : bx.shape[0]] = True
        return boxes_pad, labels_pad, valid

    @torch.no_grad()
    def assign(self, anchors: AnchorSet, gt_boxes: Tensor, gt_valid: Tensor,
               crowd_boxes: Tensor | None = None, crowd_valid: Tensor | None = None) -> Tensor:
        """Configured assigner over a padded batch -> int64[B, N] (GT index, -1 background, -2 ignore)."""
        cfg = self.cfg
        matched = self.assigner(anchors, gt_boxes, gt_valid)
        if cfg.crowd_as_ignore and crowd_boxes is not None and crowd_boxes.shape[1] > 0:
            in_crowd = assigners.crowd_ignore_mask(anchors.anchors, crowd_boxes, crowd_valid, cfg.crowd_iof_thr)
            matched = matched.masked_fill(in_crowd & (matched < 0), assigners.IGNORE)
        return matched

    def compute_losses(self, cls: Tensor, reg: Tensor, ctr: Tensor | None, anchors: AnchorSet,
                       targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Losses of a batch from flat head outputs cls float[B, N, C], reg float[B, N, 4], ctr float[B, N]."""
        cfg = self.cfg
        device = cls.device
        gt_boxes, gt_labels, gt_valid = self._pad_targets(targets, device)
        crowd_boxes = crowd_valid = None
        if cfg.crowd_as_ignore:
            crowd_boxes, _, crowd_valid = self._pad_targets(targets, device, key="crowd_boxes")
        matched = self.assign(anchors, gt_boxes, gt_valid, crowd_boxes, crowd_valid)
        pos = matched >= 0
        safe = matched.clamp(min=0)
        labels = torch.where(pos, gt_labels.gather(1, safe), torch.zeros_like(matched))
        labels = labels.masked_fill(matched == assigners.IGNORE, assigners.IGNORE)

        pos_img, pos_anchor = pos.nonzero(as_tuple=True)
        target_boxes = gt_boxes[pos_img, matched[pos_img, pos_anchor]]  # [P, 4]
        pos_anchors = anchors.anchors[pos_anchor]
        pos_points = (pos_anchors[:, :2] + pos_anchors[:, 2:]) / 2
        pos_strides = anchors.strides[pos_anchor]
        pos_reg = reg[pos_img, pos_anchor]

        if cfg.centerness:
            ctr_targets = centerness_targets(pos_points, target_boxes)
        else:
            ctr_targets = torch.ones(pos_img.shape[0], device=device)
        num_pos, ctr_sum = reduce_mean_counts(torch.tensor(float(pos_img.shape[0]), device=device),
                                              ctr_targets.sum())
        pos_norm = num_pos.clamp(min=1.0)

        loss_cls = classification_loss(cls.reshape(-1, cls.shape[-1]), labels.reshape(-1), cfg.focal_alpha,
                                       cfg.focal_gamma) / pos_norm

        if cfg.reg_loss == "giou":
            pred, target = self._decode(pos_reg, pos_anchors, pos_points, pos_strides), target_boxes
        elif cfg.regression == "box":
            pred, target = pos_reg, self.box_coder.encode(target_boxes, pos_anchors)
        else:
            pred, target = pos_reg, self.point_coder.encode(target_boxes, pos_points, pos_strides)
        reg_norm = ctr_sum.clamp(min=1e-6) if cfg.centerness else pos_norm
        loss_reg = cfg.reg_loss_weight * regression_loss(cfg.reg_loss, pred, target, ctr_targets,
                                                         cfg.smooth_l1_beta) / reg_norm
        if ctr is not None:
            loss_ctr = centerness_loss(ctr[pos_img, pos_anchor], ctr_targets) / pos_norm
        else:
            loss_ctr = cls.new_zeros(())

        self.assign_stats = self._stats(matched, gt_valid, anchors)
        return {"loss_cls": loss_cls, "loss_reg": loss_reg, "loss_centerness": loss_ctr}

    def _decode(self, rows: Tensor, anchor_boxes: Tensor, points: Tensor, strides: Tensor) -> Tensor:
        if self.cfg.regression == "box":
            return self.box_coder.decode(rows, anchor_boxes)
        return self.point_coder.decode(rows, points, strides)

    @staticmethod
    @torch.no_grad()
    def _stats(matched: Tensor, gt_valid: Tensor, anchors: AnchorSet) -> dict[str, float]:
        b, g = gt_valid.shape
        pos = matched >= 0
        pos_img, pos_anchor = pos.nonzero(as_tuple=True)
        per_gt = torch.bincount(pos_img * g + matched[pos_img, pos_anchor], minlength=b * g)[gt_valid.flatten()]
        per_level = torch.bincount(anchors.levels[pos_anchor], minlength=NUM_LEVELS).float()
        num_pos = float(pos_img.shape[0])
        num_gt = float(per_gt.shape[0])
        values = torch.cat([torch.tensor([num_gt, num_pos], device=per_gt.device),
                            (per_gt == 0).sum().float()[None], per_level / max(num_pos, 1.0)]).tolist()
        stats = {"num_gt": values[0], "num_pos": values[1],
                 "pos_per_gt": values[1] / values[0] if values[0] else 0.0, "gt_without_pos": values[2]}
        stats.update({f"pos_level_{i}": values[3 + i] for i in range(NUM_LEVELS)})
        return stats

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def postprocess(self, cls: Tensor, reg: Tensor, ctr: Tensor | None, anchors: AnchorSet,
                    image_sizes: list[tuple[int, int]],
                    original_sizes: Sequence[tuple[int, int]] | None = None) -> list[dict[str, Tensor]]:
        """Detections per image from flat head outputs (spec section 4)."""
        cfg = self.cfg
        centers = anchors.centers
        results = []
        for i in range(cls.shape[0]):
            def decode(rows: Tensor, idx: Tensor) -> Tensor:
                return self._decode(rows, anchors.anchors[idx], centers[idx], anchors.strides[idx])

            det = postprocess_image(cls[i], ctr[i] if ctr is not None else None, reg[i], anchors.num_per_level,
                                    decode, image_sizes[i], cfg.score_thresh, cfg.pre_nms_top_n,
                                    cfg.nms_thresh, cfg.detections_per_img)
            if original_sizes is not None:
                det["boxes"] = rescale_boxes(det["boxes"], image_sizes[i], tuple(original_sizes[i]))
            results.append(det)
        return results


def build_detector(cfg: DetectorConfig | str | dict[str, Any]) -> ATSSDetector:
    """An :class:`ATSSDetector` from a config, a preset name or a config dict."""
    if isinstance(cfg, str):
        cfg = get_preset(cfg)
    elif isinstance(cfg, dict):
        cfg = DetectorConfig.from_dict(cfg)
    elif not isinstance(cfg, DetectorConfig):
        raise TypeError(f"build_detector expects a DetectorConfig, preset name or dict, got {type(cfg).__name__}")
    return ATSSDetector(cfg)
