"""The one naive, materialised, float64-capable reference for every gammacl loss.

Every test compares the fused backends against these functions. They build the full N x N logit
matrix on purpose: they are the ground truth, not a fast path. `upcast=True` (default) computes in
float64; `upcast=False` computes in the inputs' own dtype, which gives "PyTorch's own error" in
that dtype for the tolerance rule in tests/tolerances.py.
"""

from gammacl.reference import gamma, modality, siglip
from gammacl.reference.clip import clip_loss, infonce_loss
from gammacl.reference.simlse import simlse, simlse_backward

__all__ = [
    "clip_loss",
    "gamma",
    "infonce_loss",
    "modality",
    "siglip",
    "simlse",
    "simlse_backward",
]
