"""What bench and profile run: gammacl's losses x backends (`LOSSES`, the one place to register a
loss), the peers (gammacl.measure.peers), and the selection from --loss / --backend / --impl.

To add a loss to both CLIs, append one `Loss(...)` to `LOSSES` below: its name, how to build a
step on a backend (`functional("my_loss")` fills a gammacl.<fn>'s positional arguments by name:
logit_scale, logit_bias, features), its float64 reference for the value check, its FLOP formula
and scaling (gammacl.measure.flops), and its memory model. Regularisers of gammacl.modality are
discovered by name (their costs are in flops.MODALITY_COST).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
from collections.abc import Callable, Sequence

import torch

from gammacl.measure import flops as fl
from gammacl.measure.cli import OUR_BACKENDS, csv_list
from gammacl.measure.inputs import Features, Step, leaves

Builder = Callable[[Features], Step]


@dataclasses.dataclass
class Impl:
    """One row family: impl x loss x backend. `build(features)` returns a Step (it may raise:
    the runner turns that into status=error rows). `reference(features64)` returns the fp64
    reference loss value used for the first-shape check, or None with `check_na` saying why.
    `scaling` is the dominant work term (flops.N2D rows are drawn against the GEMM floor)."""

    impl: str
    loss: str
    backend: str
    build: Builder
    flops: fl.FlopFn
    expected: Callable[..., tuple[int | None, str]] = fl.expected_none
    reference: Callable[[Features], torch.Tensor] | None = None
    check_na: str = "n/a"
    dtypes: tuple[torch.dtype, ...] | None = None
    devices: tuple[str, ...] = ("cpu", "cuda")
    note: str = ""
    scaling: str = fl.N2D
    quick_all_backends: bool = True
    # the gradient comes out of the forward (one-pass kernels): no backward of its own to time
    grad_in_fwd: bool = False
    # why the requested backend cannot run here (its rows say so; the others still run)
    unavailable: str | None = None

    @property
    def label(self) -> str:
        return f"{self.impl}/{self.loss}/{self.backend}"


# The check's float64 reference: the materialised gammacl.reference up to this N; above it the
# chunked torch backend in float64 (O(N*D) memory, itself tested against the reference), so a
# large first shape does not OOM on an N x N float64 matrix.
CHECK_MATERIALISED_MAX_N = 8192


def check_reference_backend(n: int) -> str:
    return "reference" if n <= CHECK_MATERIALISED_MAX_N else "torch"


def fill_args(fn: Callable, f: Features) -> tuple[list, list[torch.Tensor]]:
    """fn's required positional arguments filled by name: logit_scale -> the scale, logit_bias
    -> the bias, every other one -> the next [N, D] feature tensor. Returns (args, leaves)."""
    args, k, extra = [], 0, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.default is not p.empty:
            continue
        if p.name == "logit_scale":
            args.append(f.scale)
        elif p.name == "logit_bias":
            args.append(f.bias)
            extra.append(f.bias)
        else:
            args.append(f.feat(k))
            k += 1
    return args, leaves(f, k) + extra


def call_step(fn: Callable, backend: str | None, f: Features) -> Step:
    args, step_leaves = fill_args(fn, f)
    kw = {} if backend is None else {"backend": backend}
    return Step(lambda: fn(*args, **kw), step_leaves)


def functional(name: str, module: str = "gammacl") -> Callable[[str], Builder]:
    """backend -> builder of a step calling module.<name>(features..., backend=backend)."""

    def on(backend: str) -> Builder:
        return lambda f: call_step(getattr(importlib.import_module(module), name), backend, f)

    return on


def functional_reference(name: str, module: str = "gammacl") -> Callable[[Features], torch.Tensor]:
    def ref(f: Features) -> torch.Tensor:
        return functional(name, module)(check_reference_backend(f.n))(f).forward()

    return ref


def state_loss_class(name: str) -> type | None:
    """gammacl.<name>, or gammacl.gamma.<name> before the top-level export exists."""
    import gammacl

    cls = getattr(gammacl, name, None)
    if cls is None and importlib.util.find_spec("gammacl.gamma") is not None:
        cls = getattr(importlib.import_module("gammacl.gamma"), name, None)
    return cls


def stateful(cls_name: str, **kw) -> Callable[[str], Builder]:
    """GammaClipLoss(num_samples, ..., backend) / SogCLRLoss(num_samples, ..., backend) with
    forward(image, text, logit_scale, index); the per-sample state has N entries, index 0..N-1."""

    def on(backend: str) -> Builder:
        def build(f: Features) -> Step:
            cls = state_loss_class(cls_name)
            extra = dict(kw)
            if "generator" in inspect.signature(cls).parameters:
                # seeded per instance: the checked instance and its reference draw the same weights
                extra["generator"] = torch.Generator().manual_seed(f.seed)
            mod = cls(f.n, backend=backend, **extra)
            if isinstance(mod, torch.nn.Module):
                mod = mod.to(f.device)
            a, b, idx = f.feat(0), f.feat(1), f.index()
            return Step(lambda: mod(a, b, f.scale, idx), leaves(f, 2))

        return build

    return on


def stateful_reference(cls_name: str, **kw) -> Callable[[Features], torch.Tensor]:
    def ref(f: Features) -> torch.Tensor:
        return stateful(cls_name, **kw)(check_reference_backend(f.n))(f).forward()

    return ref


def _ref_materialised(name: str) -> Callable[[Features], torch.Tensor]:
    """gammacl.reference.<name> up to CHECK_MATERIALISED_MAX_N, else gammacl.<name> (torch)."""

    def ref(f: Features) -> torch.Tensor:
        import gammacl

        be = check_reference_backend(f.n)
        if be == "reference":
            return getattr(gammacl.reference, name)(f.feat(0), f.feat(1), f.scale)
        return getattr(gammacl, name)(f.feat(0), f.feat(1), f.scale, backend=be)

    return ref


def _rows_only(e: Callable) -> Callable:
    return lambda n, d, dt, m: e(n, d, dt, m, cols=False)


@dataclasses.dataclass(frozen=True)
class Loss:
    """A gammacl loss as bench / profile see it. build: backend -> Step builder; reference: the
    float64 value of the check; flops, scaling: gammacl.measure.flops; memory: backend -> the
    analytic memory model (None: not modelled); available: whether the package has it now;
    quick_all_backends: --quick runs it on every backend but `reference` (else the first);
    takes_backend: False for a function without a backend argument (backend column "-")."""

    name: str
    build: Callable[[str], Builder]
    reference: Callable[[Features], torch.Tensor]
    flops: fl.FlopFn
    scaling: str = fl.N2D
    memory: Callable[[str], Callable] | None = None
    available: Callable[[], bool] = lambda: True
    quick_all_backends: bool = True
    takes_backend: bool = True
    grad_in_fwd: bool = False


def _has(name: str) -> Callable[[], bool]:
    return lambda: state_loss_class(name) is not None


# ---- THE registration of gammacl's losses in bench and profile ----------------------------
LOSSES: list[Loss] = [
    Loss("clip", functional("clip_loss"), _ref_materialised("clip_loss"), fl.flops_two_pass,
         memory=lambda be: fl.EXPECTED_BY_BACKEND[be]),
    Loss("infonce", functional("infonce_loss"), _ref_materialised("infonce_loss"),
         fl.flops_two_pass, memory=lambda be: _rows_only(fl.EXPECTED_BY_BACKEND[be])),
    Loss("gamma_twopass", stateful("GammaClipLoss", update="before"),
         stateful_reference("GammaClipLoss", update="before"), fl.flops_two_pass,
         available=_has("GammaClipLoss")),
    Loss("gamma_onepass", stateful("GammaClipLoss", update="after"),
         stateful_reference("GammaClipLoss", update="after"), fl.flops_one_pass,
         available=_has("GammaClipLoss"), grad_in_fwd=True),
    Loss("sogclr", stateful("SogCLRLoss"), stateful_reference("SogCLRLoss"), fl.flops_two_pass,
         available=_has("SogCLRLoss")),
    Loss("siglip", functional("siglip_loss"), functional_reference("siglip_loss"),
         fl.flops_one_pass, memory=lambda be: fl.EXPECTED_BY_BACKEND[be], grad_in_fwd=True),
]  # fmt: skip


def _modality_losses(notes: list[str]) -> list[Loss]:
    """gammacl.modality.<x>_loss functions as Loss entries (discovered by name)."""
    try:
        modality = importlib.import_module("gammacl.modality")
    except ModuleNotFoundError:
        return []
    except Exception as exc:  # a broken module gives error rows, not a crash
        err = f"import gammacl.modality failed: {type(exc).__name__}: {exc}"
        notes.append(err)

        def broken(backend: str, err=err) -> Builder:
            def b(f: Features) -> Step:
                raise RuntimeError(err)

            return b

        return [Loss("modality", broken, broken("-"), fl.flops_none("n/a"), fl.ND)]
    out = []
    for fname in sorted(n for n in dir(modality) if n.endswith("_loss") and not n.startswith("_")):
        fn = getattr(modality, fname)
        if not callable(fn):
            continue
        flops, scaling = fl.MODALITY_COST.get(fname, fl.ROW_WISE)
        takes_backend = "backend" in inspect.signature(fn).parameters

        def build(be: str, fn=fn, takes=takes_backend) -> Builder:
            return lambda f: call_step(fn, be if takes else None, f)

        def ref(f: Features, fn=fn, takes=takes_backend) -> torch.Tensor:
            return call_step(fn, check_reference_backend(f.n) if takes else None, f).forward()

        name = fname[: -len("_loss")]
        out.append(Loss(name, build, ref, flops, scaling, quick_all_backends=False,
                        takes_backend=takes_backend))  # fmt: skip
    if hasattr(modality, "geometric_consistency_loss"):
        out += GEOMETRIC_FORMS
    return out


def _gc_pairwise(*z: torch.Tensor, upcast: bool = False) -> torch.Tensor:
    from gammacl.reference import modality as ref

    return ref.geometric_consistency_loss(*z, upcast=upcast)


def _gc_step(fn: Callable[..., torch.Tensor], k: int) -> Builder:
    """fn(z_0, ..., z_{k-1}) on k [N, D] features (k = 4: the augmented pair too)."""

    def build(f: Features) -> Step:
        z = [f.feat(i) for i in range(k)]
        return Step(lambda: fn(*z), leaves(f, k))

    return build


def _gc_reference(k: int) -> Callable[[Features], torch.Tensor]:
    return lambda f: _gc_step(lambda *z: _gc_pairwise(*z, upcast=True), k)(f).forward()


def _gc_gram(*z: torch.Tensor) -> torch.Tensor:
    from gammacl.modality import geometric_consistency_loss

    return geometric_consistency_loss(*z)


# Geometric consistency (Paper B, B.4/B.7) beside the discovered Gram form: with the augmented
# pair (L_GC + L^a_GC, 5 d x d Grams forward, 17 N*D^2 GEMM units fwd+bwd), and the materialised
# pairwise form of gammacl.reference in the input dtype (N x N Grams). The yardsticks are the
# peers gemm_gram (one [D, N] @ [N, D]) and gemm_floor (N x N x D GEMMs).
GEOMETRIC_FORMS: list[Loss] = [
    Loss("geometric_consistency_aug", lambda be: _gc_step(_gc_gram, 4), _gc_reference(4),
         fl.split(10, 24, "N*D^2 (d x d Grams with the augmented pair)", lambda n, d: n * d * d),
         fl.ND2, quick_all_backends=False, takes_backend=False),
    Loss("geometric_consistency_pairwise", lambda be: _gc_step(_gc_pairwise, 2), _gc_reference(2),
         fl.flops_none("n/a (materialised N x N Grams)"), fl.N2D, quick_all_backends=False,
         takes_backend=False),
    Loss("geometric_consistency_pairwise_aug", lambda be: _gc_step(_gc_pairwise, 4),
         _gc_reference(4), fl.flops_none("n/a (materialised N x N Grams)"), fl.N2D,
         quick_all_backends=False, takes_backend=False),
]  # fmt: skip


def our_loss_names() -> list[str]:
    """Loss names the registry offers right now (modality regularisers appear when present)."""
    return [spec.name for spec in LOSSES if spec.available()] + [
        spec.name for spec in _modality_losses([])
    ]


def our_impls(
    backends: Sequence[str], notes: list[str], unavailable: dict[str, str] | None = None
) -> list[Impl]:
    """gammacl's impls on `backends`, in their order; a backend in `unavailable` (name -> why)
    gives impls that only record why."""
    out: list[Impl] = []
    unavailable = unavailable or {}
    for spec in [s for s in LOSSES if s.available()] + _modality_losses(notes):
        for be in backends if spec.takes_backend else ["-"]:
            out.append(
                Impl(
                    "gammacl",
                    spec.name,
                    be,
                    spec.build(be),
                    spec.flops,
                    spec.memory(be) if spec.memory is not None else fl.expected_none,
                    spec.reference,
                    scaling=spec.scaling,
                    quick_all_backends=spec.quick_all_backends,
                    # the materialised reference is autograd's own backward
                    grad_in_fwd=spec.grad_in_fwd and be != "reference",
                    unavailable=unavailable.get(be),
                )
            )
    return out


def available_backends(
    device: torch.device,
    requested: str,
    notes: list[str],
    unavailable: dict[str, str] | None = None,
) -> list[str]:
    """gammacl backends usable on `device` (dispatch.resolve_backend decides); triton is never
    timed under TRITON_INTERPRET=1 (the CPU interpreter is a test harness, not a backend). A
    backend named in `requested` that cannot run here raises SystemExit, or, with `unavailable`
    given, goes there (name -> why) while the others run; SystemExit when none can."""
    from gammacl.dispatch import interpreter_on, resolve_backend

    names = OUR_BACKENDS if requested == "all" else tuple(csv_list(requested))
    out = []
    for be in names:
        if be not in OUR_BACKENDS:
            raise SystemExit(
                f"--backend: unknown backend {be!r}; choose from {','.join(OUR_BACKENDS)} or all"
            )
        if be == "triton" and interpreter_on():
            msg = (
                "TRITON_INTERPRET=1 is set: Triton kernels would run in the CPU interpreter, "
                "so the triton backend is not timed"
            )
            if requested != "all":
                raise SystemExit(f"refusing --backend triton: {msg}. Unset TRITON_INTERPRET.")
            notes.append(f"backend triton skipped: {msg}")
            continue
        try:
            resolve_backend(be, device)
        except Exception as exc:
            if requested != "all":
                if unavailable is None:
                    raise SystemExit(f"--backend {be} is unavailable on {device}: {exc}") from None
                unavailable[be] = f"backend {be} is unavailable on {device}: {exc}"[:300]
                notes.append(unavailable[be] + " (its rows say 'unavailable')")
                continue
            notes.append(f"backend {be} skipped on {device.type}: {exc}")
            continue
        out.append(be)
    if unavailable and not out:
        raise SystemExit("; ".join(unavailable.values()))
    return out
