"""A cached VTAB split held on the training device as uint8 images, normalised batch by batch."""
from __future__ import annotations

import numpy as np
import torch

from .vtab import IMAGENET_MEAN, IMAGENET_STD, load_image_cache


class Normalise:
    """uint8 images (B, H, W, 3) -> float32 (B, 3, H, W) with ImageNet mean/std, as the original."""

    def __init__(self, device: torch.device):
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), mean / std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.permute(0, 3, 1, 2).float() * self._scale - self._shift


class ImageSet:
    """A cached split on the training device: images (N, H, W, 3) uint8, labels (N,)."""

    def __init__(self, path: str, device: torch.device):
        images, labels = load_image_cache(path)
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
        self._normalise = Normalise(device)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """index (B,) -> normalised images (B, 3, H, W) float32 and labels (B,)."""
        return self._normalise(self.images[index]), self.labels[index]
