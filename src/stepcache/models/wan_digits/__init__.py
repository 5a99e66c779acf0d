"""wan-digits: a small diffusers ``WanTransformer3DModel`` trained by this project on 8x8 digits.

``load_wan_digits()`` returns a ready ``WanPipeline`` with the class embeddings that stand in for its
text encoder; ``DigitClassifier`` checks that samples are recognisable; ``training.train_bundled``
(``stepcache train wan-digits``) recreates the shipped weights.
"""

from __future__ import annotations

from stepcache.models.wan_digits.classifier import DigitClassifier
from stepcache.models.wan_digits.pipeline import ClassPromptEmbeddings, WanDigits, load_wan_digits

__all__ = ["ClassPromptEmbeddings", "DigitClassifier", "WanDigits", "load_wan_digits"]
