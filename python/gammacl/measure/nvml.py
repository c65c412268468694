"""NVML (nvidia-ml-py): the device's used memory, matched to the torch device by UUID, and a
thread that samples it while a step runs."""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import torch


def _import_pynvml():
    if os.environ.get("GAMMACL_NVML", "").lower() in ("0", "off", "no"):
        raise ImportError("NVML disabled by GAMMACL_NVML=off")
    import pynvml

    return pynvml


def _uuid_key(u: Any) -> str:
    """NVML says 'GPU-xxxxxxxx-...' (or 'MIG-...'), torch says 'xxxxxxxx-...': compare the hex."""
    s = u.decode() if isinstance(u, bytes) else str(u)
    s = s.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if s.startswith(prefix):
            s = s[len(prefix) :]
    return s


def nvml_handle_for_uuid(nvml: Any, uuid: str) -> tuple[Any, str]:
    """The NVML handle whose UUID equals torch's device UUID (NVML enumerates every GPU and
    ignores CUDA_VISIBLE_DEVICES, so indices do not match); MIG instances are searched too."""
    want = _uuid_key(uuid)
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        if _uuid_key(nvml.nvmlDeviceGetUUID(h)) == want:
            return h, f"NVML device {i}"
        try:
            if nvml.nvmlDeviceGetMigMode(h)[0]:
                for j in range(nvml.nvmlDeviceGetMaxMigDeviceCount(h)):
                    try:
                        m = nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
                    except Exception:
                        continue
                    if _uuid_key(nvml.nvmlDeviceGetUUID(m)) == want:
                        return m, f"NVML device {i} MIG {j}"
        except Exception:  # MIG queries unsupported on this GPU
            pass
    raise LookupError(f"no NVML device has the UUID {uuid} of the torch device")


@dataclasses.dataclass
class NvmlView:
    nvml: Any = None
    handle: Any = None
    error: str | None = None
    where: str = ""
    driver: str | None = None

    @property
    def ok(self) -> bool:
        return self.handle is not None

    def used(self) -> int:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)


def open_nvml(device: torch.device) -> NvmlView:
    """NVML for the torch device, or the reason it is unavailable (never raises)."""
    try:
        nvml = _import_pynvml()
    except ImportError as exc:
        why = (
            str(exc)
            if "GAMMACL_NVML" in str(exc)
            else f"nvidia-ml-py (module pynvml) is not installed ({exc})"
        )
        return NvmlView(error=why)
    try:
        nvml.nvmlInit()
    except Exception as exc:
        return NvmlView(error=f"{type(exc).__name__}: {exc}")
    view = NvmlView(nvml=nvml)
    try:
        drv = nvml.nvmlSystemGetDriverVersion()
        view.driver = drv.decode() if isinstance(drv, bytes) else str(drv)
    except Exception:
        pass
    if device.type != "cuda":
        view.error = "no CUDA device (NVML initialised, but there is no torch CUDA device)"
        return view
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        view.handle, view.where = nvml_handle_for_uuid(nvml, uuid)
    except Exception as exc:
        view.error = f"{type(exc).__name__}: {exc}"
    return view


class NvmlSampler:
    """Device used memory (NVML) sampled on a thread every `period_ms` while the block runs."""

    def __init__(self, view: NvmlView, period_ms: float) -> None:
        self.view, self.period = view, period_ms / 1e3
        self.before = self.peak = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            u = self.view.used()
            self.peak = u if self.peak is None else max(self.peak, u)
            self.samples += 1
            self._stop.wait(self.period)

    def __enter__(self) -> NvmlSampler:
        if self.view.ok:
            self.before = self.peak = self.view.used()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            u = self.view.used()
            self.peak = max(self.peak, u)
            self.samples += 1
