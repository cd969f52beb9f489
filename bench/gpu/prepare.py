"""Build bench/gpu/pack/: what the GPU check needs on the lent machine, in two parts, each carried by one
`run` call within its 64 MiB (the part plus the repository's working tree).

    .venv/bin/python bench/gpu/prepare.py          # about 5 minutes on 2 cores: downloads, xz, the corpus

- Part a (call A: `device.sh a`): ctranslate2, faster-whisper, jiwer, rapidfuzz and structlog
  wheels for CPython 3.12 x86_64 (the device's Python; numpy, tokenizers, onnxruntime,
  huggingface_hub, tqdm, PyYAML and click are there already); the bundled tiny.en with int8 weights
  (modelbin.py: its model.bin is float16 already, 75.5 MB, over a call by itself; int8 makes it 38.9
  MB, and CTranslate2 turns the weights back into float16 when loading for float16 on CUDA); the
  speech as 16 kHz int16 numpy: jfk, and the engine benchmark's 8-minute corpus (bench/corpus.py:
  jfk then Harvard sentences read by espeak-ng in five voices, the text known).
- Part b (call B: `device.sh b`): PyAV (not on the device, 35.8 MB as a wheel) for the runner's
  rows, and the same speech as Opus made by the daemon's extraction: jfk, the long file and 20
  distinct 12 s clips (the files the runner's `Worker` is queued).

Each wheel is unpacked as pip lays it out and packed again with xz (the CUDA kernels pack about 40 %
smaller than in the wheel's zip); each part folder holds `*.tar.xz` archives and `manifest.json`
(versions, sizes). The wheels' versions are the ones installed in the Python that runs this (the
repository's venv), so the device runs what the tests run. Sizes are measured at the end against
64 MiB per call, the working tree (tracked and untracked files git does not ignore) counted in each;
a part over it fails the run (exit 1), and `--measure` measures an existing pack alone.

`--without-wheels` leaves the wheels out (the test of the check on a CPU machine, whose venv has
them); `--long-seconds`, `--clips`, `--clip-seconds` make smaller speech; `--preset` sets xz's level.
`--wer-cost` prints what the int8 weights cost in word error rate on the CPU (original and carried
model, float32 and int8 compute, on jfk and the corpus) and builds nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib.metadata
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO / "bench"), str(REPO / "tests")]

import modelbin  # noqa: E402

LIMIT = 64 * 2**20
WHEELS = {"a": ("ctranslate2", "faster-whisper", "jiwer", "rapidfuzz", "structlog"), "b": ("av",)}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
MODEL_FILES = ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json", "preprocessor_config.json")
MODEL_NOTE = "gpu-check-model.json"   # report.py reads the model's label from it


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", type=Path, default=HERE / "pack", help="where the parts go (default bench/gpu/pack)")
    parser.add_argument("--build", type=Path, default=HERE / "build", help="downloads and staging (default bench/gpu/build)")
    parser.add_argument("--parts", nargs="+", choices=("a", "b"), default=["a", "b"])
    parser.add_argument("--without-wheels", action="store_true", help="model and audio only (a CPU test's venv has the packages)")
    parser.add_argument("--model", default="bundled:tiny.en", help="the model to carry with int8 weights")
    parser.add_argument("--long-seconds", type=float, default=480.0, help="the long speech file's length (default 8 min)")
    parser.add_argument("--clips", type=int, default=20, help="short files for the runner's queue (default 20)")
    parser.add_argument("--clip-seconds", type=float, default=12.0)
    parser.add_argument("--preset", default="9e", help="xz level, 0-9 with e for extreme (default 9e)")
    parser.add_argument("--measure", action="store_true", help="measure an existing pack against 64 MiB a call, build nothing")
    parser.add_argument("--wer-cost", action="store_true", help="word error rate of the int8 weights on the CPU, build nothing")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ wheels

def versions() -> dict[str, str]:
    """The wheels' versions: as installed in this Python. Raises SystemExit naming one that is missing."""
    found = {}
    for name in WHEELS["a"] + WHEELS["b"]:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed in {sys.executable}: run this with the repository's venv "
                             "(.venv/bin/python), whose versions the device gets") from None
    return found


def download(names: tuple[str, ...], pinned: dict[str, str], folder: Path) -> list[Path]:
    """The wheels of `names` at `pinned` versions for CPython 3.12 manylinux x86_64 (pip download, no
    dependencies: the device has them). Raises SystemExit with pip's last lines when pip fails."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", "--dest", str(folder), "--quiet"]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    command += [f"{name}=={pinned[name]}" for name in names]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if completed.returncode != 0:
        raise SystemExit(f"pip download failed (exit {completed.returncode}): {completed.stderr.strip()[-2000:]}")
    wheels = []
    for name in names:
        stem = name.replace("-", "_").lower()
        matches = [path for path in folder.glob("*.whl")
                   if path.name.lower().startswith(f"{stem}-{pinned[name]}-")]
        if len(matches) != 1:
            raise SystemExit(f"expected one wheel of {name} {pinned[name]} in {folder}, found {[path.name for path in matches]}")
        wheels.append(matches[0])
    return wheels


def unpack_wheel(wheel: Path, site: Path) -> None:
    """`wheel` unpacked into `site` as pip --target lays it out (a .data folder's purelib and platlib
    merged in; its scripts and headers left out)."""
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            parts = member.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            target = site.joinpath(*parts)
            if member.is_dir():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(target, "wb") as output:
                shutil.copyfileobj(source, output)
            mode = (member.external_attr >> 16) & 0o777
            if mode:
                os.chmod(target, mode)


# ----------------------------------------------------------------------------------- model, audio

def carried_model(model: str, folder: Path) -> dict:
    """`model` (a CTranslate2 Whisper folder or bundled:tiny.en) written to `folder` with int8 weights;
    what it is, for the manifest. Raises ValueError for a model that is not a CTranslate2 model.bin."""
    from whisperdrop.engine.engine import resolve_model_path

    source = Path(resolve_model_path(model))
    folder.mkdir(parents=True, exist_ok=True)
    original = modelbin.read(source / "model.bin")
    modelbin.write(modelbin.quantize_int8(original), folder / "model.bin")
    for name in MODEL_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    types = sorted({str(value.dtype) for value in original.variables.values()})
    note = {"label": f"{model.removeprefix('bundled:')} (int8 weights)", "source": model,
            "source_bytes": (source / "model.bin").stat().st_size, "bytes": (folder / "model.bin").stat().st_size,
            "source_types": types, "weights": "int8 with float32 per-row scales; other variables float16"}
    (folder / MODEL_NOTE).write_text(json.dumps(note, indent=1))
    return note


def speech(build: Path, long_seconds: float, clips: int, clip_seconds: float) -> dict:
    """The corpus (bench/corpus.py, espeak-ng) and jfk, as int16 numpy in build/a-audio and as Opus (the
    daemon's extraction) in build/b-audio, with texts.json in both; what was made."""
    import wave

    import numpy
    from corpus import jfk, speech_clips, speech_file
    from daemon_helpers import write_wav

    from whisperdrop.daemon.extract import extract

    wavs = build / "wav"
    shutil.rmtree(wavs, ignore_errors=True)
    samples, jfk_text = jfk()
    jfk_wav = write_wav(wavs / "jfk.wav", samples)
    long = speech_file(wavs, long_seconds, "long")
    made = speech_clips(wavs / "clips", clips, clip_seconds)
    texts = {"rate": 16000, "jfk": {"text": jfk_text, "seconds": round(len(samples) / 16000, 3)},
             "long": {"text": long.text, "seconds": round(long.seconds, 3), "what": long.what},
             "clips": [{"name": f"clip-{index:02d}", "text": clip.text, "seconds": round(clip.seconds, 3), "what": clip.what}
                       for index, clip in enumerate(made)]}
    numpy_folder, opus_folder = build / "a-audio", build / "b-audio"
    for folder in (numpy_folder, opus_folder):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "texts.json").write_text(json.dumps(texts, indent=1))
    for name, wav in [("jfk", jfk_wav), ("long", long.path)] + [(f"clip-{index:02d}", clip.path) for index, clip in enumerate(made)]:
        extract(wav, opus_folder / f"{name}.opus")
        if not name.startswith("clip-"):
            with wave.open(str(wav)) as reader:
                numpy.save(numpy_folder / f"{name}.npy", numpy.frombuffer(reader.readframes(reader.getnframes()), numpy.int16))
    return {"long": long.what, "clips": len(made), "clip_seconds": clip_seconds}


# ---------------------------------------------------------------------------------------- archives

def preset_value(preset: str) -> int:
    """'9e' -> 9 | PRESET_EXTREME; '0'..'9' -> that level. Raises SystemExit for anything else."""
    level = preset.rstrip("e")
    if not level.isdigit() or not 0 <= int(level) <= 9:
        raise SystemExit(f"--preset {preset!r}: expected 0 to 9, optionally followed by e (extreme)")
    return int(level) | (lzma.PRESET_EXTREME if preset.endswith("e") else 0)


def archive(source: Path, prefix: str, target: Path, preset: int) -> int:
    """Every file under `source` into `target` (tar.xz) under `prefix`/, sorted, owner and times zeroed so
    the same input gives the same bytes; the bytes written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(target, "w:xz", preset=preset) as tar:
        for path in sorted(source.rglob("*")):
            if path.is_dir():
                continue
            info = tar.gettarinfo(str(path), arcname=f"{prefix}/{path.relative_to(source).as_posix()}")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with open(path, "rb") as data:
                tar.addfile(info, data)
    return target.stat().st_size


def tree_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# --------------------------------------------------------------------------------------- measuring

def working_tree(repo: Path = REPO) -> tuple[int, int]:
    """Bytes and files of what a `run` call sends besides `carry`: tracked files and untracked ones git
    does not ignore, plus the checkout's own shared/ (which travels even when ignored)."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True, timeout=120).stdout.split(b"\0")
    paths = {repo / os.fsdecode(name) for name in listed if name}
    if (repo / "shared").is_dir():
        paths |= {path for path in (repo / "shared").rglob("*") if path.is_file()}
    sizes = [path.lstat().st_size for path in paths if path.is_symlink() or path.is_file()]
    return sum(sizes), len(sizes)


def measure(pack: Path, parts: list[str]) -> list[str]:
    """Print each call's size (working tree + part) against 64 MiB, with each archive's share; the
    problems (a part missing or over the limit), empty when every call fits."""
    tree, files = working_tree()
    print(f"working tree that travels with every call: {tree / 2**20:.2f} MiB ({files} files)")
    problems = []
    for part in parts:
        folder = pack / part
        if not folder.is_dir():
            problems.append(f"part {part}: {folder} does not exist; run bench/gpu/prepare.py")
            continue
        items = sorted(path for path in folder.rglob("*") if path.is_file())
        size = sum(path.stat().st_size for path in items)
        total = tree + size
        print(f"call {part.upper()} (carry bench/gpu/pack/{part}): {total / 2**20:.2f} MiB of {LIMIT / 2**20:.0f} MiB "
              f"= working tree {tree / 2**20:.2f} + part {size / 2**20:.2f}:")
        for path in items:
            print(f"    {path.relative_to(folder)}: {path.stat().st_size / 2**20:.2f} MiB")
        if total > LIMIT:
            problems.append(f"call {part.upper()} would send {total / 2**20:.2f} MiB, over the {LIMIT / 2**20:.0f} MiB a "
                            f"`run` call carries (part {part} {size / 2**20:.2f} MiB + working tree {tree / 2**20:.2f} MiB)")
    return problems


# ------------------------------------------------------------------------------------------ building

def build(args: argparse.Namespace) -> dict:
    """Make the parts asked for; {part: manifest}."""
    preset = preset_value(args.preset)
    pinned = versions()
    args.build.mkdir(parents=True, exist_ok=True)
    staged: dict[str, list[tuple[Path, str, str]]] = {part: [] for part in args.parts}  # (folder, prefix, archive name)
    manifests: dict[str, dict] = {part: {"part": part, "made": time.strftime("%Y-%m-%d %H:%M:%S"),
                                         "python_for": "CPython 3.12 manylinux x86_64", "wheels": {}} for part in args.parts}
    print("# speech: jfk and the corpus (espeak-ng), numpy and Opus ...", flush=True)
    made = speech(args.build, args.long_seconds, args.clips, args.clip_seconds)
    if "a" in args.parts:
        print(f"# model: {args.model} with int8 weights ...", flush=True)
        model_folder = args.build / "a-model"
        shutil.rmtree(model_folder, ignore_errors=True)
        manifests["a"]["model"] = carried_model(args.model, model_folder)
        staged["a"] += [(model_folder, "model", "model.tar.xz"), (args.build / "a-audio", "audio", "audio.tar.xz")]
        manifests["a"]["audio"] = made
    if "b" in args.parts:
        staged["b"].append((args.build / "b-audio", "audio", "audio.tar.xz"))
        manifests["b"]["audio"] = made
    if not args.without_wheels:
        for part in args.parts:
            print(f"# wheels for part {part}: {', '.join(f'{name} {pinned[name]}' for name in WHEELS[part])} ...", flush=True)
            for wheel, name in zip(download(WHEELS[part], pinned, args.build / "wheels"), WHEELS[part]):
                site = args.build / f"site-{name}"
                shutil.rmtree(site, ignore_errors=True)
                unpack_wheel(wheel, site)
                staged[part].append((site, "site", f"site-{name}.tar.xz"))
                manifests[part]["wheels"][name] = {"version": pinned[name], "wheel": wheel.name,
                                                   "wheel_bytes": wheel.stat().st_size, "unpacked_bytes": tree_bytes(site)}
    for part in args.parts:
        shutil.rmtree(args.pack / part, ignore_errors=True)
        (args.pack / part).mkdir(parents=True)
    print(f"# xz -{args.preset} ...", flush=True)
    jobs = [(folder, prefix, args.pack / part / name, part) for part in args.parts for folder, prefix, name in staged[part]]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # lzma lets go of the GIL
        sizes = list(pool.map(lambda job: archive(job[0], job[1], job[2], preset), jobs))
    for (folder, _, target, part), size in zip(jobs, sizes):
        manifests[part].setdefault("archives", {})[target.name] = {"bytes": size, "unpacked_bytes": tree_bytes(folder),
                                                                   "sha256": sha256(target)}
    for part in args.parts:
        (args.pack / part / "manifest.json").write_text(json.dumps(manifests[part], indent=1))
    return manifests


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wer_cost(args: argparse.Namespace) -> int:
    """Print the word error rates of the original and the carried model on the CPU (float32 compute, the
    nearest to float16 here, and int8), on jfk and the corpus file; sequential faster-whisper, the
    runner's options."""
    from common import wer
    from faster_whisper import WhisperModel

    from whisperdrop.engine.engine import resolve_model_path

    folder = args.build / "wer-cost"
    shutil.rmtree(folder, ignore_errors=True)
    carried = folder / "model"
    carried_model(args.model, carried)
    made = speech(folder, args.long_seconds, 0, args.clip_seconds)
    texts = json.loads((folder / "b-audio" / "texts.json").read_text())
    print("| model | compute | jfk WER % | corpus WER % | corpus words | seconds |\n|---|---|---|---|---|---|")
    for label, path in (("original (float16 weights)", resolve_model_path(args.model)), ("carried (int8 weights)", str(carried))):
        for compute in ("float32", "int8"):
            model = WhisperModel(path, device="cpu", compute_type=compute)
            started = time.perf_counter()
            errors = []
            for name in ("jfk", "long"):
                segments, _ = model.transcribe(str(folder / "b-audio" / f"{name}.opus"), word_timestamps=True,
                                               vad_filter=True, beam_size=5)
                errors.append(wer(texts[name]["text"], "".join(segment.text for segment in segments)))
            print(f"| {label} | {compute} | {errors[0]:.2f} | {errors[1]:.2f} | {len(texts['long']['text'].split())} | "
                  f"{time.perf_counter() - started:.0f} |", flush=True)
    print(f"corpus: {made['long']}, Opus 24 kbit/s as the daemon extracts it")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.wer_cost:
        return wer_cost(args)
    if not args.measure:
        started = time.monotonic()
        build(args)
        print(f"# built in {time.monotonic() - started:.0f} s", flush=True)
    problems = measure(args.pack, args.parts)
    for problem in problems:
        print(f"TOO BIG OR MISSING: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
