"""Host-side argument checks shared by every public entry point.

Everything here looks only at metadata (shape, dtype, device, strides) except `check_labels`, which
looks at user-supplied label values once (one host sync, only when the caller passes labels).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from gammacl.dispatch import BACKENDS, resolve_traced

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype: fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_features(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.device.type == "meta":
        # a meta tensor has no data to compute a loss from (torch.compile's fake tensors carry
        # the real device, so they never get here)
        raise ValueError(
            f"{name} is on the meta device (shape {tuple(x.shape)}, no data); gammacl computes "
            "losses on cpu or cuda tensors"
        )
    if x.shape[0] == 0:
        raise ValueError(
            f"{name} is an empty batch (shape {tuple(x.shape)}); batch size must be >= 1"
        )
    if x.shape[1] == 0:
        raise ValueError(f"{name} has feature dimension 0 (shape {tuple(x.shape)}); D must be >= 1")
    return x


def check_pair(
    a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor, *, same_batch: bool
) -> None:
    check_features(a_name, a)
    check_features(b_name, b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same feature dimension, "
            f"got {a.shape[1]} and {b.shape[1]} (shapes {tuple(a.shape)} and {tuple(b.shape)})"
        )
    if same_batch and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same batch size for a paired loss, "
            f"got {a.shape[0]} and {b.shape[0]}"
        )
    if a.dtype != b.dtype:
        raise TypeError(
            f"{a_name} and {b_name} must have the same dtype, got {a.dtype} and {b.dtype}"
        )
    if a.device != b.device:
        raise ValueError(
            f"{a_name} and {b_name} must be on the same device, got {a.device} and {b.device}"
        )


def as_scale(name: str, value: object, like: torch.Tensor) -> torch.Tensor:
    """A python number, 0-d or one-element tensor -> 0-d tensor in the accumulation dtype on
    `like`'s device, keeping the autograd graph of a tensor argument."""
    dtype = acc_dtype(like.dtype)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a tensor with one element, "
                f"got shape {tuple(value.shape)}"
            )
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
        return value.reshape(()).to(dtype)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    # a fill kernel, not a host-to-device copy: torch.tensor(..., device="cuda") would block on
    # the stream (cudaStreamSynchronize) every step
    return torch.full((), float(value), dtype=dtype, device=like.device)


def check_paired_step(
    image_features: object, text_features: object, logit_scale: object, backend: str
) -> tuple[torch.Tensor, str]:
    """(scale, backend name) of a paired loss step's arguments: same-batch features, the scale
    as a 0-d acc-dtype tensor, the backend resolved for the features' device."""
    check_pair("image_features", image_features, "text_features", text_features, same_batch=True)
    scale = as_scale("logit_scale", logit_scale, image_features)
    return scale, resolve_traced(backend, image_features.device)


def check_real(
    name: str, value: object, *, low: float = 0.0, strict: bool = True, high: float | None = None
) -> float:
    """A finite python number (not a bool) with value > low (>= low when not strict) and, given
    `high`, value <= high; `name` may carry its meaning, e.g. "ema (weight of the new batch
    estimate)"."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    if math.isfinite(v) and (v > low if strict else v >= low) and (high is None or v <= high):
        return v
    if high is not None:
        want = f"in {'(' if strict else '['}{low:g}, {high:g}]"
    elif low == 0.0:
        want = "a finite positive number" if strict else "a finite number >= 0"
    else:
        want = f"a finite number {'>' if strict else '>='} {low:g}"
    raise ValueError(f"{name} must be {want}, got {value!r}")


def check_positive_int(name: str, value: object) -> int:
    """Any integral number (int, numpy / torch integer scalars), returned as an int."""
    if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_choice(name: str, value: object, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def check_backend(backend: object) -> str:
    """A backend name a loss accepts (resolved per device at call time: dispatch)."""
    return check_choice("backend", backend, BACKENDS)


def check_reduction(reduction: object) -> str:
    return check_choice("reduction", reduction, REDUCTIONS)


def check_label_smoothing(label_smoothing: object) -> float:
    return check_real("label_smoothing", label_smoothing, strict=False, high=1.0)


def check_labels(
    labels: object, rows: int, cols: int, device: torch.device, *, permutation: bool = False
) -> torch.Tensor:
    """Validates user-supplied labels: range (and, with `permutation`, that every column appears
    exactly once) in one host sync."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an int64 tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer (int64) tensor, got {labels.dtype}")
    if labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the features are on {device}")
    lo, hi = torch.aminmax(labels)
    stats = [lo, hi]
    if permutation:
        counts = torch.bincount(labels.clamp(0, cols - 1).long(), minlength=cols)
        stats.append((counts == 1).all().to(lo.dtype))
    stats = torch.stack(stats).tolist()  # the one host sync
    lo, hi = stats[0], stats[1]
    if lo < 0 or hi >= cols:
        raise ValueError(f"labels must lie in [0, {cols - 1}], got values in [{lo}, {hi}]")
    if permutation and not stats[2]:
        raise ValueError(f"labels must be a permutation of 0..{cols - 1} for the symmetric loss")
    return labels.long()


def check_log_zhat(name: str, log_zhat: object, index: torch.Tensor) -> None:
    """A floating-point tensor shaped like `index` (per-position batch log Zhat)."""
    if not isinstance(log_zhat, torch.Tensor) or log_zhat.shape != index.shape:
        raise ValueError(
            f"{name} must be a tensor of shape {tuple(index.shape)}, got "
            f"{getattr(log_zhat, 'shape', type(log_zhat))}"
        )
    if not log_zhat.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {log_zhat.dtype}")


def check_log_rates(name: str, log_rate: object, n: int) -> None:
    """Per-sample log-rates: a finite tensor of shape [n] (one host sync for the finite check)."""
    if not isinstance(log_rate, torch.Tensor) or log_rate.shape != (n,):
        raise ValueError(
            f"{name} must be a tensor of shape ({n},), got "
            f"{getattr(log_rate, 'shape', type(log_rate))}"
        )
    if not bool(torch.isfinite(log_rate).all()):
        raise ValueError(f"{name} must be finite")
