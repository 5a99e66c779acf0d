"""A digit classifier trained on the real 8x8 digits, used to check that generated samples are recognisable.

An RBF support-vector machine on the 64 raw pixels: it fits the 1797 real digits in well under a second
and labels held-out real digits correctly about 99% of the time, so it is trained at use time rather
than shipped.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from stepcache.models.wan_digits.data import IMAGE_SIZE, PIXEL_MAX, load_digit_pixels

logger = logging.getLogger(__name__)


class DigitClassifier:
    """Predicts the class 0..9 of (N, 8, 8) pixel arrays in 0..16 (the scale of ``load_digit_pixels``).

    Args:
        pixels: training images (N, 8, 8); default: all real digits.
        labels: their classes (N,).

    Example:
        >>> clf = DigitClassifier()
        >>> clf.accuracy(pixels, labels)   # fraction labelled with the requested class
    """

    def __init__(self, pixels: np.ndarray | None = None, labels: np.ndarray | None = None) -> None:
        from sklearn.svm import SVC

        if (pixels is None) != (labels is None):
            raise ValueError("pass both pixels and labels, or neither (to train on all real digits)")
        if pixels is None:
            pixels, labels = load_digit_pixels()
        # gamma / C suit raw 0..16 pixels (64 features); the SVM is deterministic for a given input.
        self._svm = SVC(kernel="rbf", gamma=0.001, C=10.0)
        self._svm.fit(self._features(pixels), np.asarray(labels))
        logger.debug("fitted digit classifier on %d images", len(labels))

    @staticmethod
    def _features(pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        array = pixels.detach().cpu().numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
        if array.ndim != 3 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"pixels must have shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}), got {array.shape}")
        return np.clip(array.reshape(len(array), -1).astype(np.float64), 0.0, PIXEL_MAX)

    def predict(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Class 0..9 of each image."""
        return self._svm.predict(self._features(pixels)).astype(np.int64)

    def accuracy(self, pixels: np.ndarray | torch.Tensor, labels) -> float:
        """Fraction of images whose predicted class equals the requested label."""
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(pixels):
            raise ValueError(f"got {len(pixels)} images but {len(labels)} labels")
        return float((self.predict(pixels) == labels).mean())
