"""The detector end to end: every preset trains/evaluates at a small size; the eval contract."""
from __future__ import annotations

import pytest
import torch

from detector import PRESETS, ATSSDetector, build_detector, get_preset

def _targets():
    return [
        {"boxes": torch.tensor([[10.0, 20.0, 70.0, 60.0], [50.0, 30.0, 90.0, 64.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_trains_and_predicts(name):
    torch.manual_seed(0)
    # The full-size presets as they are (R-50, 256 channels, 80 classes) on small images.
    tiny = "tiny" in name
    model = build_detector(get_preset(name, num_classes=5) if tiny else get_preset(name))
    assert isinstance(model, ATSSDetector)
    model.train()
    images = torch.randn(2, 3, 96, 128) if tiny else torch.randn(2, 3, 64, 96)
    losses = model(images, _targets())
    assert set(losses) == {"loss_cls", "loss_reg", "loss_centerness"}
    for key, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    total = sum(losses.values())
    total.backward()
    grads = [p.grad for p in model.head.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    stats = model.assign_stats
    assert stats["num_gt"] == 2 and stats["num_pos"] > 0
    assert abs(sum(stats[f"pos_level_{i}"] for i in range(5)) - 1.0) < 1e-5

    model.eval()
    with torch.no_grad():
        out = model(images, original_sizes=[(192, 256), (96, 128)])
    assert len(out) == 2
    for det, (h0, w0) in zip(out, [(192, 256), (96, 128)]):
        assert det["boxes"].shape[1] == 4 and det["boxes"].shape[0] == det["scores"].shape[0] == det["labels"].shape[0]
        assert det["labels"].dtype == torch.int64
        if det["boxes"].numel():
            assert det["boxes"][:, 0::2].max() <= w0 and det["boxes"][:, 1::2].max() <= h0
            assert det["labels"].min() >= 1 and det["labels"].max() <= model.cfg.num_classes
