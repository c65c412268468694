"""gammacl: fused, memory-frugal contrastive losses for PyTorch.

Public API (README.md): clip_loss, infonce_loss, ClipLoss, GammaClipLoss, SogCLRLoss,
FeatureSeparationLoss, BrownianBridgeLoss, GeometricConsistencyLoss, siglip_loss, SigLipLoss;
`python -m gammacl.bench`, `python -m gammacl.profile`.
"""

from gammacl import _layout, reference  # noqa: F401  (_layout binds gammacl.kernels)
from gammacl.clip import ClipLoss, clip_loss, infonce_loss
from gammacl.dispatch import BACKENDS, resolve_backend
from gammacl.gamma import GammaClipLoss, LogRateState, SogCLRLoss, gamma_step_loss
from gammacl.modality import (
    BrownianBridgeLoss,
    FeatureSeparationLoss,
    GeometricConsistencyLoss,
    ModalityContrastiveLoss,
    brownian_bridge_loss,
    feature_separation_loss,
    geometric_consistency_loss,
    inmodal_infonce_loss,
    modality_contrastive_loss,
    orthogonality_loss,
    uniformity_loss,
)
from gammacl.siglip import SigLipLoss, siglip_loss

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BrownianBridgeLoss",
    "ClipLoss",
    "FeatureSeparationLoss",
    "GammaClipLoss",
    "GeometricConsistencyLoss",
    "LogRateState",
    "ModalityContrastiveLoss",
    "SigLipLoss",
    "SogCLRLoss",
    "brownian_bridge_loss",
    "clip_loss",
    "feature_separation_loss",
    "gamma_step_loss",
    "geometric_consistency_loss",
    "infonce_loss",
    "inmodal_infonce_loss",
    "modality_contrastive_loss",
    "orthogonality_loss",
    "reference",
    "resolve_backend",
    "siglip_loss",
    "uniformity_loss",
]
