"""A feature space for the built-in synthetic set that penalises smoothing and noise alike.

Pixel statistics reward smooth images on this set: a blurred blob sits close to the mean of the
sharp rectangles it blurs. A small convolutional network trained on clean synthetic images to
recognise what decides each one (`ambient_fast.data.synthetic.ATTRIBUTES`: the rectangle's
colour, the background, the rectangle's size and corner) maps an image to features in which a
blurred or a noisy image lies off the clean images' manifold: its edges, hence its size and
corner, and its colour are no longer what any clean image shows.

`SyntheticClassifier` is the network; `train_classifier` trains it on fresh clean images (a new
random stream of the synthetic distribution, never the training or held-out images);
`ClassifierFeatures` turns uint8 images into its features and its confidence. With
`ambient_fast.evaluation.metrics.precision_recall` and `frechet_distance` they score samples.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ambient_fast.data.synthetic import ATTRIBUTES, attribute_classes, labelled_images
from ambient_fast.files.atomic import write_bytes

__all__ = ["SyntheticClassifier", "train_classifier", "ClassifierFeatures", "CLASSIFIER_STREAM"]

CLASSIFIER_STREAM = 7  # the synthetic stream its training images come from (0: training set, 1: held-out)


class SyntheticClassifier(nn.Module):
    """Three 3x3 convolutions (the last two of stride 2), a `features`-wide layer, and one linear
    head per attribute. Input: (N, 3, R, R) on [-1, 1]; `features(x)`: (N, features)."""

    def __init__(self, resolution: int = 16, width: int = 32, features: int = 128):
        super().__init__()
        self.resolution, self.width, self.feature_count = resolution, width, features
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * width * (resolution // 4) ** 2, features), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(features, count)
                                    for name, count in attribute_classes(resolution).items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> "dict[str, torch.Tensor]":
        """Logits per attribute: {name: (N, classes)}."""
        hidden = self.features(x)
        return {name: head(hidden) for name, head in self.heads.items()}


def _as_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 3, R, R) -> float32 on [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float() / 127.5 - 1


def train_classifier(resolution: int = 16, steps: int = 1500, batch: int = 256, seed: int = 0,
                     lr: float = 2e-3) -> SyntheticClassifier:
    """A SyntheticClassifier trained with Adam on `steps` batches of fresh clean images (stream
    CLASSIFIER_STREAM of `seed`, then the next seeds), the sum of the heads' cross-entropies."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        net = SyntheticClassifier(resolution)
    finally:
        torch.random.set_rng_state(generator_state)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        images, attributes = labelled_images(batch, resolution, seed + step, CLASSIFIER_STREAM)
        logits = net(_as_input(images))
        loss = sum(F.cross_entropy(logits[name], torch.from_numpy(attributes[name])) for name in ATTRIBUTES)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return net.eval().requires_grad_(False)


class ClassifierFeatures:
    """uint8 (N, 3, R, R) images -> the classifier's features float64 (N, features), and how
    surely it recognises them (`confidence`). Saved and loaded as safetensors with its sizes."""

    def __init__(self, net: SyntheticClassifier, batch_size: int = 512):
        self.net, self.batch_size = net.eval(), batch_size

    def _outputs(self, images: np.ndarray):
        if images.ndim != 4 or images.shape[1:] != (3, self.net.resolution, self.net.resolution):
            raise ValueError(f"the classifier takes uint8 (N, 3, {self.net.resolution}, {self.net.resolution}) "
                             f"images, got {images.dtype} {images.shape}")
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                x = _as_input(images[start:start + self.batch_size])
                hidden = self.net.features(x)
                yield hidden, {name: head(hidden) for name, head in self.net.heads.items()}

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate([hidden.double().numpy() for hidden, _ in self._outputs(images)])

    def confidence(self, images: np.ndarray) -> np.ndarray:
        """float64 (N,): per image, the smallest over the attributes of the classifier's top
        probability: near 1 only when it is sure of every attribute."""
        parts = [torch.stack([F.softmax(value, 1).amax(1) for value in logits.values()]).amin(0)
                 for _, logits in self._outputs(images)]
        return torch.cat(parts).double().numpy()

    def accuracy(self, images: np.ndarray, attributes: "dict[str, np.ndarray]") -> "dict[str, float]":
        """Share of images whose attribute the classifier names correctly, per attribute."""
        logits = {name: [] for name in ATTRIBUTES}
        for _, batch_logits in self._outputs(images):
            for name, value in batch_logits.items():
                logits[name].append(value.argmax(1))
        return {name: float((torch.cat(parts).numpy() == attributes[name]).mean()) for name, parts in logits.items()}

    def save(self, path: Union[str, Path]) -> None:
        from safetensors.torch import save

        sizes = dict(resolution=self.net.resolution, width=self.net.width, features=self.net.feature_count)
        write_bytes(path, save({k: v.contiguous() for k, v in self.net.state_dict().items()},
                               metadata={"sizes": json.dumps(sizes)}))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ClassifierFeatures":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            sizes = json.loads((f.metadata() or {})["sizes"])
            state = {key: f.get_tensor(key) for key in f.keys()}
        net = SyntheticClassifier(**sizes)
        net.load_state_dict(state)
        return cls(net.requires_grad_(False))
