"""Scores for generated digits, from a classifier trained on the real ones.

- **conditional accuracy**: how often the classifier reads the digit the prompt asked for;
- **Frechet distance** between Gaussians fitted to the classifier's hidden-layer features of the
  generated images and of the held-out real digits (FID's formula with this small network in place
  of Inception). It is biased upwards for small sample counts: compare runs with the same count;
- **within-class spread**: the per-class pixel standard deviation of the generated images next to the
  real held-out ones of the same classes; a generator that collapses to one image per class scores ~0.

The classifier is scikit-learn's ``MLPClassifier`` (one ReLU layer of 64 units) on the 64 pixels of the
train split of ``load_digits_split(seed)``; it fits in about a second and is cached per process and seed.
Train the generator on that same train split so the held-out digits stay unseen by both.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch

from latteflow.data.digits import IMAGE_SHAPE, NUM_CLASSES, load_digits_split
from latteflow.data.images import from_uint8

__all__ = ["DigitsClassifier", "EvalResult", "evaluate", "frechet_distance", "gaussian_statistics",
           "get_classifier", "within_class_spread"]

_HIDDEN = 64


def _as_digit_images(images, name: str = "images") -> np.ndarray:
    """float64 ``(N, 64)`` pixels in [-1, 1] from float ``(N, 1|3, 8, 8)`` or uint8 ``(N, 8, 8, 1|3)``."""
    try:
        x = from_uint8(images)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None
    if tuple(x.shape[2:]) != IMAGE_SHAPE[1:]:
        raise ValueError(f"{name} must be 8x8 digits, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} hold NaN or inf")
    x = x.mean(dim=1)  # RGB -> grey; a single channel is unchanged
    return x.reshape(x.shape[0], -1).numpy().astype(np.float64)


def _as_labels(labels, n: int, name: str = "labels") -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.shape != (n,):
        raise ValueError(f"{name} must hold one label per image ({n}), got shape {arr.shape}")
    if n and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() >= NUM_CLASSES):
        raise ValueError(f"{name} must be ints in 0..{NUM_CLASSES - 1}")
    return arr.astype(np.int64)


class DigitsClassifier:
    """A seeded MLP on raw pixels; ``features`` are its hidden ReLU activations (64 per image)."""

    def __init__(self, seed: int = 0):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency

        split = load_digits_split(seed)
        x = _as_digit_images(split.train_images)
        y = split.train_labels.numpy()
        self.seed = seed
        self._mlp = MLPClassifier(hidden_layer_sizes=(_HIDDEN,), alpha=1e-3, max_iter=1000, random_state=seed)
        # One BLAS thread: these matrices are tiny, extra threads only fight over shared cores (5x slower
        # under load) and a fixed thread count keeps the fit reproducible.
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("error", ConvergenceWarning)  # an under-fit scorer must fail loudly
            self._mlp.fit(x, y)
        self.test_images = split.test_images
        self.test_labels = split.test_labels
        self.test_accuracy = self.accuracy(split.test_images, split.test_labels)

    def predict(self, images) -> np.ndarray:
        """Predicted digit per image, int64 ``(N,)``."""
        return self._mlp.predict(_as_digit_images(images)).astype(np.int64)

    def predict_proba(self, images) -> np.ndarray:
        return self._mlp.predict_proba(_as_digit_images(images))

    def features(self, images) -> np.ndarray:
        """Hidden-layer activations ``relu(x W1 + b1)``, float64 ``(N, 64)``."""
        x = _as_digit_images(images)
        return np.maximum(x @ self._mlp.coefs_[0] + self._mlp.intercepts_[0], 0.0)

    def accuracy(self, images, labels) -> float:
        pred = self.predict(images)
        return float((pred == _as_labels(labels, len(pred))).mean())


@lru_cache(maxsize=4)
def get_classifier(seed: int = 0) -> DigitsClassifier:
    """The classifier for ``seed``, fitted once per process."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return DigitsClassifier(seed)


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``(N, D)`` features, float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    ``tr (S1 S2)^(1/2)`` is computed as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix ``S1^(1/2) S2 S1^(1/2)`` (same eigenvalues as ``S1 S2``), which stays real and finite for
    singular covariances where ``scipy.linalg.sqrtm`` can return complex noise."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean, 0.0))


def within_class_spread(images, labels) -> float:
    """Mean over classes (with >= 2 images) of ``sqrt(mean over pixels of the unbiased variance)``, in
    [-1, 1] pixel units. NaN when no class has two images."""
    x = _as_digit_images(images)
    y = _as_labels(labels, x.shape[0])
    per_class = [np.sqrt(x[y == c].var(axis=0, ddof=1).mean()) for c in range(NUM_CLASSES) if (y == c).sum() >= 2]
    return float(np.mean(per_class)) if per_class else float("nan")


@dataclass(frozen=True)
class EvalResult:
    accuracy: float            # classifier prediction == requested digit
    frechet_distance: float    # features of the images vs the held-out real digits
    spread_generated: float    # within-class pixel std of the images
    spread_real: float         # the same for held-out real digits of the requested classes
    num_samples: int

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(images, labels, *, seed: int = 0) -> EvalResult:
    """Score images that were asked to show digits ``labels``.

    ``images``: float ``(N, 1, 8, 8)`` in [-1, 1] (torch or numpy) or uint8 ``(N, 8, 8, 1)``; ``labels``:
    the requested digit per image (ints 0..9). ``seed`` picks the data split and the classifier; use the
    split the generator was trained on. Needs N >= 2 for the Frechet distance."""
    clf = get_classifier(seed)
    x = _as_digit_images(images)
    if x.shape[0] < 2:
        raise ValueError(f"images must hold at least 2 images for a Frechet distance, got {x.shape[0]}")
    y = _as_labels(labels, x.shape[0])
    xt = torch.from_numpy(x.astype(np.float32)).reshape(-1, *IMAGE_SHAPE)
    accuracy = float((clf.predict(xt) == y).mean())
    fd = frechet_distance(*gaussian_statistics(clf.features(xt)), *gaussian_statistics(clf.features(clf.test_images)))
    real_keep = np.isin(clf.test_labels.numpy(), np.unique(y))
    spread_real = within_class_spread(clf.test_images[torch.from_numpy(real_keep)], clf.test_labels[torch.from_numpy(real_keep)])
    return EvalResult(accuracy=accuracy, frechet_distance=fd, spread_generated=within_class_spread(xt, y),
                      spread_real=spread_real, num_samples=int(x.shape[0]))
