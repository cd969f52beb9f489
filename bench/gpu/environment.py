"""What the GPU check runs on: the packages and CUDA libraries that loaded, the GPU, its memory, and a
PyAV stand-in for a machine without PyAV.

- `use_pyav_stand_in()`: put a module named `av` in sys.modules whose every attribute raises
  PyAVMissing (an AttributeError that says to carry pack part b). faster-whisper imports `av` when
  it is imported but decodes only when given a path, so numpy audio works without PyAV; a path
  fails at once with that message instead of somewhere deep in a decoder.
- `packages()`: version and file of each package the check uses (None where it is absent).
- `mapped_libraries()`: the CUDA and CTranslate2 shared libraries this process has mapped, from
  /proc/self/maps (the real files: a `libcublas.so.12` link shows as the CUDA 13 file it points to).
- `gpus()`: nvidia-smi's name, driver and memory per GPU, or [] without nvidia-smi.
- `MemorySampler`: samples the GPU's used memory every 50 ms (NVML through nvidia-ml-py, else
  nvidia-smi every 250 ms) and keeps the peak per phase; says it measured nothing without either.
- `peak_rss_mib()`: this process's peak resident memory (VmHWM).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

PACKAGES = {"ctranslate2": "ctranslate2", "faster_whisper": "faster-whisper", "av": "av", "numpy": "numpy",
            "tokenizers": "tokenizers", "onnxruntime": "onnxruntime", "jiwer": "jiwer", "structlog": "structlog"}
LIBRARY_MARKS = ("libcublas", "libcudart", "libcuda.", "libcudnn", "libctranslate2", "libnccl", "libnvrtc")


class PyAVMissing(AttributeError):
    """Raised for any use of the PyAV stand-in."""


class _PyAVStandIn(types.ModuleType):
    def __getattr__(self, name: str):
        raise PyAVMissing(f"PyAV is not installed here (av.{name} was asked for): this run decodes no file; "
                          "the runner's rows need PyAV: carry bench/gpu/pack/b (bench/README.md, GPU check)")


def use_pyav_stand_in() -> None:
    """Make `import av` give the stand-in. Raises RuntimeError when the real PyAV is imported already."""
    existing = sys.modules.get("av")
    if existing is not None and not isinstance(existing, _PyAVStandIn):
        raise RuntimeError("PyAV is imported already; the stand-in must be installed before faster-whisper is imported")
    sys.modules["av"] = _PyAVStandIn("av")


def pyav_is_stand_in() -> bool:
    return isinstance(sys.modules.get("av"), _PyAVStandIn)


def packages() -> dict[str, dict | None]:
    """{module: {"version", "file"}} for PACKAGES, None for one that cannot be imported (imports them)."""
    found: dict[str, dict | None] = {}
    for module_name, distribution in PACKAGES.items():
        if module_name == "av" and pyav_is_stand_in():
            found[module_name] = {"version": None, "file": "stand-in (no PyAV: numpy audio only)"}
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            found[module_name] = None if "No module named" in str(error) else {"version": None, "error": str(error)}
            continue
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            version = getattr(module, "__version__", None)
        found[module_name] = {"version": version, "file": getattr(module, "__file__", None)}
    return found


def mapped_libraries(maps: str | None = None) -> list[str]:
    """The files of LIBRARY_MARKS this process maps, sorted (from `maps`, default /proc/self/maps)."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return []
    paths = {line.split(None, 5)[5].strip() for line in maps.splitlines() if len(line.split(None, 5)) == 6}
    return sorted(path for path in paths if any(mark in os.path.basename(path) for mark in LIBRARY_MARKS))


def gpus() -> list[dict]:
    """[{"name", "driver", "memory_total_mib"}] per GPU nvidia-smi lists; [] without nvidia-smi or a GPU."""
    try:
        completed = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                    "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if completed.returncode != 0:
        return []
    found = []
    for line in completed.stdout.strip().splitlines():
        name, driver, total = (part.strip() for part in line.split(","))
        found.append({"name": name, "driver": driver, "memory_total_mib": float(total)})
    return found


def peak_rss_mib() -> float | None:
    """VmHWM of this process in MiB, or None where /proc has none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class MemorySampler:
    """The GPU's used memory (MiB) sampled in a thread: `baseline` when started, the peak per `phase`.

    `source` is "nvml", "nvidia-smi" or None (nothing to sample with: every figure stays None).
    Use as a context manager; `phase(name)` names what runs now.
    """

    def __init__(self, device_index: int = 0):
        self.device_index = device_index
        self.source: str | None = None
        self.baseline: float | None = None
        self.peaks: dict[str, float] = {}
        self.error: str | None = None
        self._phase = "start"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read = self._reader()

    def _reader(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
            self.source, self.interval = "nvml", 0.05
            return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
        except Exception as error:  # no nvidia-ml-py, no driver, no device: try nvidia-smi
            self.error = f"NVML: {type(error).__name__}: {error}"
        command = ["nvidia-smi", f"--id={self.device_index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]

        def smi() -> float:
            return float(subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout.split()[0])

        try:
            smi()
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as error:
            self.error = f"{self.error}; nvidia-smi: {type(error).__name__}: {error}"
            return None
        self.source, self.interval = "nvidia-smi", 0.25
        return smi

    def __enter__(self) -> "MemorySampler":
        if self._read is not None:
            self.baseline = self._read()
            self._thread = threading.Thread(target=self._run, name="gpu-memory-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        if self._read is not None:
            self._sample()

    def phase(self, name: str) -> None:
        if self._read is not None:
            self._sample()
        self._phase = name

    def _sample(self) -> None:
        try:
            used = self._read()
        except Exception as error:  # a sampler that fails stops sampling; the figures say so
            self.error = f"{type(error).__name__}: {error}"
            self._stop.set()
            return
        self.peaks[self._phase] = max(self.peaks.get(self._phase, 0.0), used)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def figures(self) -> dict:
        """{"source", "baseline_mib", "peak_mib", "peak_by_phase_mib", "error"}."""
        peak = max(self.peaks.values()) if self.peaks else None
        return {"source": self.source, "baseline_mib": self.baseline, "peak_mib": peak,
                "peak_by_phase_mib": {name: round(value, 1) for name, value in self.peaks.items()}, "error": self.error}
