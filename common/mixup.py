"""Batch-level Mixup / CutMix with label smoothing: (images, labels) -> (mixed images, soft targets)."""
from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn.functional as F


def one_hot_smooth(labels: paddle.Tensor, num_classes: int, smoothing: float) -> paddle.Tensor:
    """(B,) class indices -> (B, num_classes): (1 - smoothing) on the class plus smoothing / num_classes."""
    return F.label_smooth(F.one_hot(labels, num_classes), epsilon=smoothing)


class Mixup:
    """Batch-level Mixup / CutMix with label smoothing (as timm's Mixup, batch mode): each batch is mixed with
    its reverse. Returns (images, soft targets (B, classes)); targets sum to 1."""

    def __init__(self, mixup: float, cutmix: float, prob: float, smoothing: float, num_classes: int, seed: int = 0):
        self.mixup, self.cutmix, self.prob = mixup, cutmix, prob
        self.smoothing, self.num_classes = smoothing, num_classes
        self.seed(seed)

    def seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, images: paddle.Tensor, labels: paddle.Tensor):
        targets = one_hot_smooth(labels, self.num_classes, self.smoothing)
        use_mix = self.mixup > 0 or self.cutmix > 0
        if not use_mix or self.rng.random() >= self.prob:
            return images, targets
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or self.rng.random() < 0.5)
        lam = float(self.rng.beta(*(2 * [self.cutmix if use_cutmix else self.mixup])))
        flipped = images.flip(0)
        if use_cutmix:
            H, W = images.shape[2:]
            cut = math.sqrt(1.0 - lam)
            ch, cw = int(H * cut), int(W * cut)
            cy, cx = int(self.rng.integers(H)), int(self.rng.integers(W))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
            mask = paddle.zeros([1, 1, H, W], images.dtype)
            mask[:, :, y0:y1, x0:x1] = 1.0
            images = images * (1 - mask) + flipped * mask
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)   # the area actually kept
        else:
            images = images * lam + flipped * (1.0 - lam)
        return images, targets * lam + targets.flip(0) * (1.0 - lam)
