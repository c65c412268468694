"""gammacl: fused, memory-frugal contrastive losses for PyTorch.

Public API (design.md): clip_loss, infonce_loss, ClipLoss, GammaClipLoss, SogCLRLoss,
FeatureSeparationLoss, BrownianBridgeLoss, GeometricConsistencyLoss; `python -m gammacl.bench`,
`python -m gammacl.profile`.
"""

from gammacl import reference
from gammacl.dispatch import BACKENDS, resolve_backend
from gammacl.functional import clip_loss, infonce_loss
from gammacl.losses import ClipLoss

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ClipLoss",
    "clip_loss",
    "infonce_loss",
    "reference",
    "resolve_backend",
]
