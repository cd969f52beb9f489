"""What a model's name says about the model: whether it is one of Whisper's English-only models, and
the multilingual names to suggest instead.

Used where a job's options are checked (`profiles`: translate with an English-only model is refused),
where a Result is built (`outputs.result`: a warning when such a model heard another language) and by
the whisper-cli drop-in. Imports nothing from whisperdrop.
"""

from __future__ import annotations

MULTILINGUAL_MODELS = "tiny, base, small, medium, large-v3"


def english_only(model: str | None) -> bool:
    """Whether `model` (a name, `bundled:tiny.en` or a folder) is one of Whisper's English-only models."""
    name = (model or "").rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1].lower()
    return name.endswith(".en") or name.startswith("distil-")  # distil-whisper's models are English-only
