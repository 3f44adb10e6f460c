"""COCO category ids <-> contiguous training labels.

COCO numbers its 80 categories 1..90 with gaps. The model wants contiguous labels ``1..C`` with
``0`` meaning background, so the sorted COCO ids map to ``1..C`` in order and back again for
results files and test-dev submissions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["CategoryMap"]


@dataclass(frozen=True)
class CategoryMap:
    """Label ``k`` (1-based) is COCO category ``ids[k - 1]`` named ``names[k - 1]``.

    Build it with :meth:`from_coco` (sorts by COCO id, as the paper's code does) or restore a
    stored one with :meth:`from_list` (keeps the stored label order).
    """

    ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.names):
            raise ValueError(f"CategoryMap: {len(self.ids)} ids but {len(self.names)} names")
        if not self.ids:
            raise ValueError("CategoryMap: no categories")
        if len(set(self.ids)) != len(self.ids):
            dup = sorted({i for i in self.ids if self.ids.count(i) > 1})
            raise ValueError(f"CategoryMap: duplicate category ids {dup}")
        if min(self.ids) < 0:
            raise ValueError(f"CategoryMap: negative category id {min(self.ids)}")
        # Lookup table COCO id -> label (0 = unknown); ids are small (COCO: <= 90).
        lut = np.zeros(max(self.ids) + 1, dtype=np.int64)
        lut[np.asarray(self.ids, dtype=np.int64)] = np.arange(1, len(self.ids) + 1)
        object.__setattr__(self, "_lut", lut)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_coco(cls, categories: Iterable[Mapping]) -> "CategoryMap":
        """From a COCO ``categories`` block (any order); labels follow sorted COCO ids."""
        cats = sorted(((int(c["id"]), str(c.get("name", c["id"]))) for c in categories))
        return cls(tuple(i for i, _ in cats), tuple(n for _, n in cats))

    @classmethod
    def from_list(cls, items: Sequence[Mapping]) -> "CategoryMap":
        """Inverse of :meth:`to_list`: ``[{"id", "name"}, ...]`` in label order."""
        try:
            return cls(tuple(int(c["id"]) for c in items), tuple(str(c["name"]) for c in items))
        except (KeyError, TypeError) as e:
            raise ValueError(f"CategoryMap.from_list: every entry needs 'id' and 'name' ({e!r})") from e

    def to_list(self) -> list[dict]:
        """``[{"id": coco_id, "name": name}, ...]`` in label order (checkpoints, submissions)."""
        return [{"id": i, "name": n} for i, n in zip(self.ids, self.names)]

    # -- mapping ------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def to_labels(self, coco_ids) -> np.ndarray:
        """COCO ids (any int array-like) -> int64 labels in ``1..C``; unknown ids give 0."""
        ids = np.asarray(coco_ids, dtype=np.int64)
        out = np.zeros(ids.shape, dtype=np.int64)
        ok = (ids >= 0) & (ids < len(self._lut))
        out[ok] = self._lut[ids[ok]]
        return out

    def to_coco_ids(self, labels) -> np.ndarray:
        """Labels in ``1..C`` (int array-like or tensor) -> int64 COCO ids."""
        lab = np.asarray(labels, dtype=np.int64)
        if lab.size and (lab.min() < 1 or lab.max() > self.num_classes):
            raise ValueError(f"labels must lie in 1..{self.num_classes}, got {lab.min()}..{lab.max()}")
        return np.asarray(self.ids, dtype=np.int64)[lab - 1]
