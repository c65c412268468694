"""Host-side argument checks of the simlse triton launchers (kernels/simlse.py and its large-D
path): every message names the argument and the values."""

from __future__ import annotations

import torch

from gammacl.kernels.tiles import acc_dtype as _acc_dtype

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_features(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, col_scale=None, cols: bool = False
) -> bool:
    """Checks the features and the scales; True in vector mode (scale [M], col_scale [N] when
    cols: gammacl.ops.simlse)."""
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"simlse (triton): {name} must be a torch.Tensor, got {type(x)}")
        if x.ndim != 2:
            raise ValueError(f"simlse (triton): {name} must be 2-D, got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"simlse (triton): {name} must be float16/bfloat16/float32/float64, got {x.dtype}"
            )
        if x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(
                f"simlse (triton): {name} must have a contiguous last dim (stride(-1) == 1), "
                f"got strides {tuple(x.stride())}"
            )
        if x.device.type not in ("cuda", "cpu"):
            raise ValueError(
                f"simlse (triton): {name} is on {x.device}; need cuda (or cpu "
                "under TRITON_INTERPRET=1)"
            )
    if a.dtype != b.dtype:
        raise ValueError(f"simlse (triton): a and b dtypes differ: {a.dtype} vs {b.dtype}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"simlse (triton): a and b feature dims differ: {tuple(a.shape)} vs {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"simlse (triton): a on {a.device} but b on {b.device}")
    acc = _acc_dtype(a.dtype)
    if isinstance(scale, torch.Tensor) and scale.shape == (a.shape[0],):
        check_vector("scale", scale, a.shape[0], acc, a.device)
        if cols:
            if col_scale is None:
                raise ValueError("simlse (triton): a vector scale with cols=True needs col_scale")
            check_vector("col_scale", col_scale, b.shape[0], acc, a.device)
        return True
    if col_scale is not None:
        raise ValueError("simlse (triton): col_scale needs a vector scale of shape [M]")
    if not isinstance(scale, torch.Tensor) or scale.ndim != 0:
        raise ValueError(
            f"simlse (triton): scale must be a 0-d tensor (or [M] = [{a.shape[0]}] row "
            "scales), got "
            f"{tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale)}"
        )
    if scale.dtype != acc or scale.device != a.device:
        raise ValueError(
            f"simlse (triton): scale must be a 0-d {acc} tensor on {a.device}, "
            f"got {scale.dtype} on {scale.device}"
        )
    return False


def check_operands(op: str, a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """The feature checks of the one-sweep ops' launchers (gamma_onepass, siglip): a [M, D] and
    b [N, D] float tensors with stride(-1) == 1 that agree in D, dtype and device; returns the
    accumulation dtype."""
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{op} (triton): {name} must be a 2-D float16/bfloat16/float32/float64 "
                f"tensor, got {getattr(x, 'shape', type(x))}"
            )
        if x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(
                f"{op} (triton): {name} needs stride(-1) == 1, got strides {tuple(x.stride())}"
            )
    if a.dtype != b.dtype or a.shape[1] != b.shape[1] or a.device != b.device:
        raise ValueError(
            f"{op} (triton): a {tuple(a.shape)} {a.dtype} {a.device} and b {tuple(b.shape)} "
            f"{b.dtype} {b.device} must agree in D, dtype, device"
        )
    return _acc_dtype(a.dtype)


def check_vector(name: str, v: torch.Tensor, n: int, acc: torch.dtype, device) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.shape != (n,):
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v)
        raise ValueError(f"simlse (triton): {name} must have shape ({n},), got {shape}")
    if v.dtype != acc or v.device != device:
        raise ValueError(
            f"simlse (triton): {name} must be {acc} on {device}, got {v.dtype} on {v.device}"
        )
    return v.contiguous()
