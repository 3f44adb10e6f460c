"""A tiny ATSS model memorises a handful of synthetic images on CPU."""
from __future__ import annotations

import torch
from torchvision.ops import box_iou

from detector import build_detector, get_preset


def _synthetic(n=4, size=96, seed=0):
    """Noise images with 1-2 solid rectangles whose colour is the class (3 classes)."""
    gen = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[1.5, -1.0, -1.0], [-1.0, 1.5, -1.0], [-1.0, -1.0, 1.5]])
    images, targets = [], []
    for i in range(n):
        image = torch.randn(3, size, size, generator=gen) * 0.3
        boxes, labels = [], []
        for _ in range(1 + i % 2):
            w, h = torch.randint(20, 56, (2,), generator=gen).tolist()
            x = int(torch.randint(0, size - w, (1,), generator=gen))
            y = int(torch.randint(0, size - h, (1,), generator=gen))
            c = int(torch.randint(0, 3, (1,), generator=gen))
            image[:, y:y + h, x:x + w] = colours[c][:, None, None]
            boxes.append([x, y, x + w, y + h])
            labels.append(c + 1)
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return torch.stack(images), targets


def test_tiny_atss_overfits_synthetic_images():
    torch.manual_seed(0)
    images, targets = _synthetic()
    model = build_detector(get_preset("tiny", num_classes=3)).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(40):
        losses = model(images, targets)
        total = sum(losses.values())
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
        history.append({k: v.item() for k, v in losses.items()})
    first, last = history[0], history[-1]
    # Centerness BCE has soft targets, so its floor is its targets' entropy; the other two must fall.
    assert last["loss_cls"] < 0.1 * first["loss_cls"]
    assert last["loss_reg"] < 0.4 * first["loss_reg"]
    assert sum(last.values()) < 0.5 * sum(first.values())
    assert model.assign_stats["gt_without_pos"] == 0

    model.eval()
    with torch.no_grad():
        detections = model(images, original_sizes=[(192, 192)] * len(targets))
    for det, target in zip(detections, targets):
        g = target["boxes"].shape[0]
        # The g best detections are the g objects, with their classes, back at twice the input scale.
        top = det["scores"].argsort(descending=True)[:g]
        assert top.numel() == g
        iou = box_iou(target["boxes"] * 2, det["boxes"][top])
        best = iou.max(dim=1)
        assert (best.values > 0.5).all(), iou
        assert torch.equal(det["labels"][top][best.indices], target["labels"])
        assert (det["scores"][top] > 0.3).all()
