"""GPUs through NVML, when nvidia-ml-py (``pip install 'aiservice[gpu]'``) and an NVIDIA driver are present."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import threading
from collections.abc import Callable
from datetime import timedelta
from types import ModuleType
from typing import Any

from aiservice.sidecar.report import Report, available, unavailable


class GpuSource:
    """Initialises NVML once, on the first collection that finds it, and shuts it down on close."""

    def __init__(self, timeout: timedelta) -> None:
        self._timeout = timeout.total_seconds()
        self._nvml: ModuleType | None = None
        # NVML calls block, so they run in a thread; one collection at a time keeps a hung
        # driver from tying up every worker thread.
        self._lock = threading.Lock()

    async def collect(self) -> Report:
        return await asyncio.to_thread(self._collect)

    async def close(self) -> None:
        await asyncio.to_thread(self._shutdown)

    def _collect(self) -> Report:
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError:
            return unavailable("NVML unavailable: nvidia-ml-py is not installed (pip install 'aiservice[gpu]')")
        if not self._lock.acquire(timeout=self._timeout):
            return unavailable("NVML is busy with an earlier collection")
        try:
            if self._nvml is None:
                nvml.nvmlInit()
                self._nvml = nvml
            count = int(nvml.nvmlDeviceGetCount())
            devices = [_device(nvml, index) for index in range(count)]
            return available(driver_version=_text(_field(nvml, nvml.nvmlSystemGetDriverVersion)), devices=devices)
        except nvml.NVMLError as exc:
            return unavailable(f"NVML error: {exc}")
        finally:
            self._lock.release()

    def _shutdown(self) -> None:
        with self._lock:
            if self._nvml is not None:
                nvml, self._nvml = self._nvml, None
                with contextlib.suppress(nvml.NVMLError):
                    nvml.nvmlShutdown()


def _field(nvml: ModuleType, query: Callable[..., Any], *args: object) -> Any:
    """One reading; None where this GPU does not support it (power on some boards, for one)."""
    try:
        return query(*args)
    except nvml.NVMLError:
        return None


def _text(value: object) -> str | None:
    if value is None:
        return None
    # Older nvidia-ml-py releases return bytes.
    return value.decode() if isinstance(value, bytes) else str(value)


def _watts(milliwatts: Any) -> float | None:
    return None if milliwatts is None else round(float(milliwatts) / 1000, 1)


def _device(nvml: ModuleType, index: int) -> dict[str, object]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    utilization = _field(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
    memory = _field(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)
    temperature = _field(nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
    return {
        "index": index,
        "name": _text(_field(nvml, nvml.nvmlDeviceGetName, handle)),
        "utilization_percent": None if utilization is None else int(utilization.gpu),
        "memory_used_bytes": None if memory is None else int(memory.used),
        "memory_total_bytes": None if memory is None else int(memory.total),
        "temperature_c": None if temperature is None else int(temperature),
        "power_w": _watts(_field(nvml, nvml.nvmlDeviceGetPowerUsage, handle)),
        "power_limit_w": _watts(_field(nvml, nvml.nvmlDeviceGetEnforcedPowerLimit, handle)),
    }
