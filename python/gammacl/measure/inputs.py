"""Measured inputs and steps: seeded features, one computation in three modes, the GEMM floor."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from gammacl.measure.cli import MODES


class Features:
    """Seeded L2-normalised [N, D] leaf tensors (requires_grad) made on demand, plus the learnable
    0-d fp32 logit scale. The same (seed, N, D, dtype) gives identical tensors for every impl."""

    def __init__(
        self, n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int, scale: float
    ) -> None:
        self.n, self.d, self.dtype, self.device, self.seed = n, d, dtype, device, seed
        self.scale_value = float(scale)
        self.scale = torch.tensor(
            float(scale), dtype=torch.float32, device=device, requires_grad=True
        )
        self._feats: dict[int, torch.Tensor] = {}
        self._bias: torch.Tensor | None = None

    @property
    def bias(self) -> torch.Tensor:
        """A learnable 0-d fp32 logit bias, -10 (SigLIP's initial value), made on demand."""
        if self._bias is None:
            self._bias = torch.tensor(-10.0, device=self.device, requires_grad=True)
        return self._bias

    def feat(self, k: int) -> torch.Tensor:
        if k not in self._feats:
            g = torch.Generator(device=self.device).manual_seed(self.seed * 1000 + k)
            x = torch.randn(self.n, self.d, device=self.device, dtype=self.dtype, generator=g)
            step = max(1, 2**25 // self.d)  # normalise in fp32 row blocks: <= 128 MiB temporary
            with torch.no_grad():
                for i in range(0, self.n, step):
                    x[i : i + step] = F.normalize(x[i : i + step].float(), dim=1).to(self.dtype)
            self._feats[k] = x.requires_grad_()
        return self._feats[k]

    def index(self) -> torch.Tensor:
        return torch.arange(self.n, device=self.device)

    def grads_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._feats.values())

    def upcast(self) -> Features:
        """The same values in float64, no grad: the inputs of the reference check."""
        return _Upcast(self)


class _Upcast(Features):
    def __init__(self, src: Features) -> None:
        super().__init__(src.n, src.d, torch.float64, src.device, src.seed, src.scale_value)
        self.scale = src.scale.detach().double()
        self._src = src

    @property
    def bias(self) -> torch.Tensor:
        return self._src.bias.detach().double()

    def feat(self, k: int) -> torch.Tensor:
        if k not in self._feats:
            self._feats[k] = self._src.feat(k).detach().double()
        return self._feats[k]


def leaves(f: Features, k: int) -> list[torch.Tensor]:
    """The first k feature tensors and the logit scale: what a step's backward writes into."""
    return [f.feat(i) for i in range(k)] + [f.scale]


class Step:
    """One measured computation on fixed inputs. `forward()` returns the loss tensor; modes:
    fwd = forward with autograd recording (as in training); fwd+bwd = forward().backward();
    bwd = backward(retain_graph=True) of one recorded forward (Liger's convention)."""

    def __init__(self, forward: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor]):
        self.forward = forward
        self.leaves = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]

    def clear_grads(self) -> None:
        for t in self.leaves:
            t.grad = None

    def prepare(self, mode: str) -> Callable[[], Any]:
        if mode == "fwd":
            return self.forward
        if mode == "fwd+bwd":
            return lambda: self.forward().backward()
        if mode == "bwd":
            loss = self.forward()
            return lambda: loss.backward(retain_graph=True)
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


class FloorStep(Step):
    """The 4 N x N x D GEMMs a recomputing fused fwd+bwd must do, in the input dtype, no epilogue:
    S = A B^T (fwd); S again, dA = S B, dB = S^T A (bwd)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__(lambda: a @ b.t(), [])
        self.a, self.b = a.detach(), b.detach()

    def prepare(self, mode: str) -> Callable[[], Any]:
        a, b = self.a, self.b

        def fwd():
            return a @ b.t()

        def bwd():
            s = a @ b.t()
            return s @ b, s.t() @ a

        def both():
            fwd()
            return bwd()

        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}[mode]


class GramFloorStep(Step):
    """The unit GEMM of the d x d Gram form (gammacl.modality.geometric_consistency_loss):
    G = V^T V, [D, N] @ [N, D], 2 N D^2 FLOPs, in the accumulation dtype as the Grams are
    formed; the same single GEMM for every mode."""

    def __init__(self, a: torch.Tensor) -> None:
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        self.a = a.detach().to(acc)
        super().__init__(lambda: self.a.t() @ self.a, [])

    def prepare(self, mode: str) -> Callable[[], Any]:
        a = self.a
        return lambda: a.t() @ a
