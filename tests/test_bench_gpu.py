"""The prepared GPU check (bench/gpu/, issue 20) on this CPU machine: the pack, the wrapper, the check's rows.

A small pack (a short corpus, the int8 model, no wheels: this venv has the packages) goes through
bench/gpu/device.sh exactly as on the lent machine, with --device auto so the CPU rows run. The full
pack (wheels, 8-minute corpus) is not built here: it downloads about 80 MB and takes minutes of xz;
prepare.py measures it against 64 MiB a call itself, and the guard is tested below.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon_helpers import jfk_reference, word_error_rate
from media import JFK
from sshd import skip_or_fail

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "bench" / "gpu"


def load(name: str):
    """bench/gpu/<name>.py as a module, with sys.path as it was afterwards (check.py puts bench/ on it)."""
    saved = list(sys.path)
    try:
        specification = importlib.util.spec_from_file_location(f"gpu_{name}", GPU / f"{name}.py")
        module = importlib.util.module_from_spec(specification)
        sys.modules[specification.name] = module  # dataclasses look their module up there
        specification.loader.exec_module(module)
        return module
    finally:
        sys.path[:] = saved


modelbin = load("modelbin")


def run(command: list[str], environment: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, **(environment or {})})
    completed.output = completed.stdout + completed.stderr
    return completed


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """bench/gpu/prepare.py's two parts, small: a 20 s corpus file, 3 clips of 6 s, no wheels."""
    if shutil.which("espeak-ng") is None:
        skip_or_fail("needs espeak-ng for the benchmark corpus (apt-get install espeak-ng)")
    root = tmp_path_factory.mktemp("gpu-check")
    completed = run([sys.executable, str(GPU / "prepare.py"), "--pack", str(root / "pack"), "--build", str(root / "build"),
                     "--without-wheels", "--long-seconds", "20", "--clips", "3", "--clip-seconds", "6", "--preset", "0"])
    assert completed.returncode == 0, completed.output
    assert "call A (carry bench/gpu/pack/a)" in completed.stdout and "call B (carry bench/gpu/pack/b)" in completed.stdout
    return root


def device(root: Path, part: str, *arguments: str, work: str = "work") -> subprocess.CompletedProcess:
    """bench/gpu/device.sh PART as the lent machine runs it, on this venv's Python, with OUT set."""
    (root / "out").mkdir(exist_ok=True)
    return run(["bash", str(GPU / "device.sh"), part, *arguments],
               {"WD_GPU_PYTHON": sys.executable, "WD_GPU_PACK": str(root / "pack"), "WD_GPU_WORK": str(root / work),
                "OUT": str(root / "out")})


@pytest.fixture(scope="module")
def call_a(pack):
    """Call A on this machine: part a unpacked, the bare rows on numpy audio with the PyAV stand-in."""
    completed = device(pack, "a", "--device", "auto")
    return completed, pack


def test_call_a_runs_the_bare_rows_without_pyav_and_writes_its_json(call_a):
    """device.sh a unpacks part a, says CUDA is unavailable, runs bare sequential and batched faster-whisper
    on numpy audio with PyAV replaced by the stand-in, and writes real-time factors and word error rates."""
    completed, root = call_a
    assert completed.returncode == 0, completed.output
    assert "CUDA unavailable here" in completed.stdout
    report = json.loads((root / "out" / "gpu-check-a.json").read_text())
    assert report["device"] == "cpu" and report["rows"] and "stopped" not in report
    assert report["packages"]["av"]["file"].startswith("stand-in")
    figures = report["figures"]
    assert set(figures["long"]) >= {"sequential", "batched"} and "runner" not in figures["long"]
    for name in ("sequential", "batched"):
        item = figures["long"][name]
        assert item["seconds"] > 0 and item["rtf"] == pytest.approx(item["seconds"] / figures["long"]["audio_s"], rel=0.01)
        assert 0 <= item["wer"] <= 100, item
    assert figures["long"]["sequential"]["wer"] <= 35  # bare batched may drop speech at a chunk's start: not bounded
    assert set(figures["ratios"]) == {"long_batched_vs_sequential"}
    assert report["model_label"] == "tiny.en (int8 weights)"


def test_call_b_runs_every_row_through_the_runner(call_a):
    """device.sh b on the machine that ran call A: the runner's Worker on the long file and the clips queued
    at once (all in one step: batches across jobs), beside bare sequential and batched, same model and
    options; ratios, word error rates and the Worker's executed_on in the JSON."""
    _, root = call_a
    completed = device(root, "b", "--device", "auto")
    assert completed.returncode == 0, completed.output
    report = json.loads((root / "out" / "gpu-check-b.json").read_text())
    figures = report["figures"]
    assert report["device"] == "cpu" and report["packages"]["av"]["version"]
    assert set(figures["long"]) >= {"sequential", "batched", "runner"}
    assert set(figures["short"]) >= {"sequential", "batched", "across_jobs"} and figures["short"]["files"] == 3
    assert set(figures["ratios"]) == {"long_batched_vs_sequential", "long_runner_vs_sequential", "long_runner_vs_batched",
                                      "short_across_jobs_vs_sequential", "short_across_jobs_vs_batched"}
    assert all(value > 0 for value in figures["ratios"].values())
    for group, name in (("long", "runner"), ("short", "across_jobs")):
        assert 0 <= figures[group][name]["wer"] <= 35, figures[group][name]
    assert figures["runner"]["device"] == "cpu" and figures["runner"]["compute_type"] == "int8"
    assert figures["runner"]["batch_size"] == 16 and figures["runner"]["jobs_batched_max"] == 3
    assert "GPU CHECK on CPU" in completed.stdout and "| gpu |" in completed.stdout


def test_call_b_on_a_fresh_machine_says_to_run_call_a_again(pack):
    """Call B where part a was never unpacked (the machine went back between the calls) stops at once
    with exit 4 and says to run call A, then call B at once."""
    completed = device(pack, "b", "--device", "auto", work="fresh-work")
    assert completed.returncode == 4, completed.output
    assert "GPU CHECK STOPPED: part a is not unpacked" in completed.stdout and "Run call A again" in completed.stdout


def test_check_stops_with_one_line_when_cuda_is_required_and_absent(call_a):
    """With --device cuda (device.sh's default) on a machine where CTranslate2 sees no GPU, the check
    stops with one line saying CUDA cannot be used, exits 3 and still writes its JSON with the reason
    (part a, unpacked by the call before, is not unpacked again)."""
    _, root = call_a
    completed = device(root, "a")
    assert completed.returncode == 3, completed.output
    assert "# part a: unpacked already" in completed.stdout
    assert "GPU CHECK STOPPED: CUDA cannot be used: CTranslate2 sees no CUDA device" in completed.stdout
    report = json.loads((root / "out" / "gpu-check-a.json").read_text())
    assert report["stopped"].startswith("CUDA cannot be used") and report["cuda_device_count"] == 0


def test_probe_ladder_measures_the_first_compute_type_that_works(pack):
    """The probe transcribes jfk in a child process per compute type, in order: a type the device refuses
    (float16 on this CPU) is reported with the child's error, the next that works is chosen and its
    child reports the CTranslate2 library it mapped; when none works the check stops, naming each."""
    check = load("check")
    args = argparse.Namespace(model=str(pack / "build" / "a-model"), audio=pack / "build" / "b-audio")
    chosen, report, failures = check.probe_ladder(args, "cpu", ["float16", "int8"])
    assert chosen == "int8" and list(failures) == ["float16"]
    assert "float16" in failures["float16"] and "exit 1" in failures["float16"]
    assert word_error_rate(jfk_reference(), report["sequential"]) <= 0.10
    assert any("libctranslate2" in path for path in report["libraries"])
    with pytest.raises(check.Stop) as stopped:
        check.probe_ladder(args, "cpu", ["float16", "bfloat16"])
    assert stopped.value.code == 3 and str(stopped.value).startswith("CUDA cannot be used: float16: ")
    assert "; bfloat16: " in str(stopped.value)


def test_prepare_refuses_a_call_over_64_mib(tmp_path):
    """prepare.py --measure fails (exit 1) naming the call when a part and the working tree together
    exceed what one `run` call carries, and passes a part under it."""
    part = tmp_path / "pack" / "a"
    part.mkdir(parents=True)
    (part / "manifest.json").write_text("{}")
    command = [sys.executable, str(GPU / "prepare.py"), "--measure", "--pack", str(tmp_path / "pack"), "--parts", "a"]
    with open(part / "site-ctranslate2.tar.xz", "wb") as sparse:
        sparse.truncate(2**20)
    small = run(command)
    assert small.returncode == 0, small.output
    assert "working tree that travels with every call" in small.stdout and "site-ctranslate2.tar.xz: 1.00 MiB" in small.stdout
    with open(part / "site-ctranslate2.tar.xz", "wb") as sparse:
        sparse.truncate(64 * 2**20)
    big = run(command)
    assert big.returncode == 1, big.output
    assert "call A would send" in big.stderr and "over the 64 MiB" in big.stderr


def test_int8_model_round_trips_and_transcribes_jfk_with_float_compute(tmp_path):
    """modelbin writes the bundled model.bin back byte for byte, and its int8 copy, half the size, loads in
    CTranslate2 with float32 compute (weights turned back into floats, as float16 on CUDA) and transcribes jfk."""
    from faster_whisper import WhisperModel

    from whisperdrop.engine.engine import resolve_model_path

    source = Path(resolve_model_path("bundled:tiny.en"))
    original = modelbin.read(source / "model.bin")
    modelbin.write(original, tmp_path / "same.bin")
    assert (tmp_path / "same.bin").read_bytes() == (source / "model.bin").read_bytes()
    carried = tmp_path / "model"
    carried.mkdir()
    modelbin.write(modelbin.quantize_int8(original), carried / "model.bin")
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(source / name, carried / name)
    assert (carried / "model.bin").stat().st_size < 0.55 * (source / "model.bin").stat().st_size
    model = WhisperModel(str(carried), device="cpu", compute_type="float32")
    segments, _ = model.transcribe(str(JFK), beam_size=5, vad_filter=True)
    assert word_error_rate(jfk_reference(), "".join(segment.text for segment in segments)) <= 0.10
