"""One-line integrations of gammacl's losses into the libraries users train with.

Each submodule imports its library only when used (optional extras):

- ``gammacl.integrations.sentence_transformers``: ``MultipleNegativesRankingLoss`` (and the
  symmetric variant) with sentence-transformers' constructor and call, computed without the B x B
  score matrix; ``GammaMultipleNegativesRankingLoss`` / ``SogCLRMultipleNegativesRankingLoss``;
  ``CachedMultipleNegativesRankingLoss`` (GradCache) and its Gamma / SogCLR variants.
  ``pip install gammacl[sentence-transformers]``.
- ``gammacl.integrations.transformers``: ``clip_loss_from_inputs(model, ...)`` for Hugging Face
  ``CLIPModel`` (and CLIPModel-like models) and ``apply_gammacl_to_clip()`` / ``revert`` (CLIPModel
  and SiglipModel, with the sigmoid loss).
  ``pip install gammacl[transformers]``.
- ``gammacl.integrations.open_clip``: ``apply()`` / ``revert()`` route open_clip's ``ClipLoss``
  through gammacl; ``OpenClipGammaLoss`` for the gamma / SogCLR losses in open_clip's trainer.
  ``pip install gammacl[open-clip]``.
"""

from __future__ import annotations

import importlib


def require(module: str, extra: str):
    """Imports an optional library, or raises ImportError naming the gammacl extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this gammacl integration needs `{module}`: pip install 'gammacl[{extra}]'"
        ) from exc


__all__ = ["require"]
