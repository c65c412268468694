"""The peers bench / profile compare against: the naive materialised loss (always), its
torch.compile, open_clip, memeff, inf_cl, siglip-kernel when installed, and the 4-GEMM floor.
A peer is an `Impl` built here; to add one, add a spec to `PEER_SPECS` and a case to `_build`."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gammacl.measure import flops as fl
from gammacl.measure.inputs import Features, FloorStep, GramFloorStep, Step, leaves
from gammacl.measure.registry import Impl, _ref_materialised, functional_reference

_ref_clip = _ref_materialised("clip_loss")


_ref_siglip = functional_reference("siglip_loss")


def naive_clip(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """open_clip's ClipLoss formula, materialised: fp32 logits, CE in both directions."""
    logits = scale * (a @ b.t()).float()
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def _peer_available(module: str) -> tuple[bool, str]:
    try:
        ok = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError) as exc:
        return False, f"{module}: {exc}"
    return ok, "" if ok else f"{module} not installed"


# name, module, loss, backend label, dtypes (None: any), devices, checked against clip, note
PEER_SPECS = [
    ("open_clip", "open_clip", "clip", "torch", None, ("cpu", "cuda"), True,
     "open_clip.loss.ClipLoss"),
    ("memeff", "memeff", "clip", "triton", None, ("cuda",), True,
     "fixed temperature 1/scale (not learnable)"),
    ("inf_cl", "inf_cl", "clip", "triton", (torch.float32,), ("cuda",), True,
     "cal_flash_loss both directions, fp32"),
    ("open_clip_siglip", "open_clip", "siglip", "torch", None, ("cpu", "cuda"), True,
     "open_clip.loss.SigLipLoss (materialised logits)"),
    ("siglip_kernel", "siglip_kernel", "siglip", "triton", None, ("cuda",), False,
     "fused sigmoid loss: time only (its normalisation not checked against ours)"),
]  # fmt: skip


def _build(name: str, f: Features) -> Step:
    a, b, s = f.feat(0), f.feat(1), f.scale
    if name == "open_clip":
        from open_clip.loss import ClipLoss

        mod = ClipLoss()
        return Step(lambda: mod(a, b, s), leaves(f, 2))
    if name == "memeff":
        from memeff import MemoryEfficientCLIPLoss

        mod = MemoryEfficientCLIPLoss(
            temperature=1.0 / f.scale_value, normalized_inputs=True, stable=False
        )
        return Step(lambda: mod(a, b), [a, b])
    if name == "inf_cl":
        from inf_cl import cal_flash_loss

        def inf_cl() -> torch.Tensor:
            return 0.5 * (
                cal_flash_loss(a, b, scale=s).mean() + cal_flash_loss(b, a, scale=s).mean()
            )

        return Step(inf_cl, leaves(f, 2))
    if name == "open_clip_siglip":
        from open_clip.loss import SigLipLoss

        mod, bias = SigLipLoss(), f.bias
        return Step(lambda: mod(a, b, s, bias), leaves(f, 2) + [bias])
    if name == "siglip_kernel":
        from siglip_kernel import fused_siglip_loss

        bias = f.bias
        return Step(lambda: fused_siglip_loss(a, b, s.log(), bias), leaves(f, 2) + [bias])
    raise ValueError(name)


def peer_impls(
    device: torch.device, requested: set[str], notes: list[str], *, for_profile: bool
) -> list[Impl]:
    """Peers that are installed (never required). The naive loss (open_clip's formula) always
    is; torch.compile of it is on by default only on CUDA (compiling per shape on a 2-core CPU
    costs tens of seconds; name naive_compiled in --impl to force it)."""
    out: list[Impl] = []
    on_gpu = device.type == "cuda"

    def want(name: str) -> bool:
        return "all" in requested or name in requested

    def naive(impl: str, backend: str, make: Callable[[], Callable], note: str) -> Impl:
        """The naive loss as built by make() per shape (fn(a, b, scale))."""

        def build(f: Features) -> Step:
            fn, a, b = make(), f.feat(0), f.feat(1)
            return Step(lambda: fn(a, b, f.scale), leaves(f, 2))

        return Impl(impl, "clip", backend, build, fl.flops_two_pass, fl.expected_materialised,
                    _ref_clip, note=note)  # fmt: skip

    def compiled_naive() -> Callable:
        torch._dynamo.reset()  # a fresh graph per shape: no recompile-limit fallback to eager
        return torch.compile(naive_clip, dynamic=False)

    if want("naive"):
        out.append(naive("naive", "torch", lambda: naive_clip,
                         "open_clip's formula, fp32 logits, materialised"))  # fmt: skip
    if "naive_compiled" in requested or ("all" in requested and on_gpu):
        out.append(naive("naive_compiled", "inductor", compiled_naive,
                         "torch.compile(naive), compile time excluded (warmup)"))  # fmt: skip
    elif "all" in requested:
        notes.append(
            "naive_compiled (torch.compile) left out on CPU: compiling per shape takes "
            "tens of seconds here; pass --impl naive_compiled to include it"
        )
    for name, module, loss, be, dtypes, devices, checked, note in PEER_SPECS:
        if not want(name):
            continue
        ok, why = _peer_available(module)
        if not ok:
            notes.append(f"peer {name} skipped: {why}")
            continue
        if device.type not in devices:
            notes.append(f"peer {name} skipped: runs on {'/'.join(devices)} only")
            continue
        out.append(
            Impl(
                name,
                loss,
                be,
                lambda f, name=name: _build(name, f),
                fl.flops_one_pass if loss == "siglip" else fl.flops_two_pass,
                fl.expected_materialised if module == "open_clip" else fl.expected_none,
                ({"clip": _ref_clip, "siglip": _ref_siglip}[loss] if checked else None),
                check_na="n/a" if checked else "n/a (sigmoid loss: a different loss)",
                dtypes=dtypes,
                devices=devices,
                note=note,
            )
        )
    if want("gemm_floor") and not for_profile:
        out.append(
            Impl("gemm_floor", "floor", "torch", lambda f: FloorStep(f.feat(0), f.feat(1)),
                 fl.flops_floor, check_na="n/a (not a loss)",
                 note="4 GEMMs in the input dtype" + ("" if on_gpu else " (CPU floor)"))
        )  # fmt: skip
    if want("gemm_gram") and not for_profile:
        out.append(
            Impl("gemm_gram", "floor_gram", "torch", lambda f: GramFloorStep(f.feat(0)),
                 lambda n, d, mode: (2 * n * d * d, "2*N*D^2 (1 GEMM [D,N]@[N,D], any mode)"),
                 check_na="n/a (not a loss)", scaling=fl.ND2,
                 note="the Gram form's unit GEMM in the accumulation dtype")
        )  # fmt: skip
    return out
