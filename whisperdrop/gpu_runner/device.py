"""Who the runner is: its default name and its GPU's name (from the CUDA driver, when there is one)."""

from __future__ import annotations

import ctypes

from whisperdrop.gpu_runner.store import HOSTNAME
from whisperdrop.shared.spool import check_runner_name


def default_name(device_index: int) -> str:
    """`<short hostname>-gpu<N>`, with characters a runner name may not hold replaced by '-'."""
    host = "".join(char if char.isascii() and (char.isalnum() or char in "_-") else "-"
                   for char in HOSTNAME.split(".")[0]).lstrip("_-")
    return check_runner_name(f"{host[:50] or 'runner'}-gpu{device_index}")


def gpu_name(device_index: int) -> str | None:
    """The CUDA device's name through the driver API (libcuda), or None without a driver or device."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device = ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), device_index) != 0:
        return None
    if cuda.cuDeviceGetName(name, len(name), device) != 0:
        return None
    return name.value.decode(errors="replace") or None
