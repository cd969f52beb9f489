"""What `whisper-cli` writes, made from a whisperdrop Result: the files (`.txt`, `.vtt`, `.srt`,
`.csv`, `.lrc`, `.json`) and the transcript it prints on stdout, in whisper.cpp's formats.

The formats follow whisper.cpp's examples/cli/cli.cpp (output_txt, output_vtt, output_srt,
output_csv, output_lrc, output_json and the segment callback): times are kept in centiseconds as
whisper.cpp keeps them, so `offsets` are whole multiples of 10 ms and `timestamps` read
`HH:MM:SS,mmm`. Segment texts keep their leading space, as whisper.cpp's do. Pure functions of the
Result and the flags: `whisper_cli` does the I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from whisperdrop import __version__
from whisperdrop.outputs.words import word_groups

EXTENSIONS = ("txt", "vtt", "srt", "csv", "json", "lrc")  # the order whisper-cli writes them in


@dataclass(frozen=True)
class Segment:
    """One transcript segment in whisper.cpp's units: `t0`, `t1` in centiseconds; `words` the
    Result's words (start, end, word, probability) that fall in it."""

    t0: int
    t1: int
    text: str
    words: tuple = field(default_factory=tuple)


def centiseconds(seconds: float) -> int:
    return max(0, int(round(float(seconds) * 100)))


def segments_of(result: dict, max_len: int = 0) -> list[Segment]:
    """The Result's segments as whisper.cpp's. With `max_len` above 0 (`-ml`), each segment is cut
    between words so that its text holds at most `max_len` characters; a single longer word stands
    alone, as in whisper.cpp with `-sow`. A cut falls only between whole words of the text, never
    inside one that whisper timed in pieces (`" t"`, `"-shirt"`; see `outputs.words`). A segment
    without words is kept whole."""
    segments = []
    for segment in result.get("segments") or []:
        words = tuple(segment.get("words") or ())
        if max_len <= 0 or not words:
            segments.append(Segment(centiseconds(segment["start"]), centiseconds(segment["end"]),
                                    segment.get("text", ""), words))
            continue
        piece: list[dict] = []
        for group in word_groups(list(words), result.get("language")):
            length = sum(len(item["word"]) for item in piece)
            if piece and length + sum(len(word["word"]) for word in group) > max_len:
                segments.append(_segment_of_words(piece))
                piece = []
            piece.extend(group)
        if piece:
            segments.append(_segment_of_words(piece))
    return segments


def _segment_of_words(words: list[dict]) -> Segment:
    return Segment(centiseconds(words[0]["start"]), centiseconds(words[-1]["end"]),
                   "".join(word["word"] for word in words), tuple(words))


def timestamp(t: int, comma: bool = False) -> str:
    """whisper.cpp's `to_timestamp`: centiseconds as `HH:MM:SS.mmm` (`,` before the milliseconds with `comma`)."""
    milliseconds = t * 10
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    seconds, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{',' if comma else '.'}{milliseconds:03d}"


def printed(segments: list[Segment], no_timestamps: bool = False) -> str:
    """What whisper-cli prints on stdout for one file: a blank line, then `[from --> to]  text` per
    segment (with `-nt`, the texts run on), then the blank line it prints after the inference."""
    if no_timestamps:
        return "\n" + "".join(segment.text for segment in segments) + "\n"
    lines = "".join(f"[{timestamp(s.t0)} --> {timestamp(s.t1)}]  {s.text}\n" for s in segments)
    return "\n" + lines + "\n"


def render_txt(segments: list[Segment]) -> str:
    return "".join(f"{segment.text}\n" for segment in segments)


def render_vtt(segments: list[Segment]) -> str:
    cues = "".join(f"{timestamp(s.t0)} --> {timestamp(s.t1)}\n{s.text}\n\n" for s in segments)
    return "WEBVTT\n\n" + cues


def render_srt(segments: list[Segment], offset_n: int = 0) -> str:
    return "".join(f"{index + 1 + offset_n}\n{timestamp(s.t0, True)} --> {timestamp(s.t1, True)}\n{s.text}\n\n"
                   for index, s in enumerate(segments))


def render_csv(segments: list[Segment]) -> str:
    rows = "".join(f'{10 * s.t0},{10 * s.t1},"{s.text.replace(chr(34), chr(34) * 2)}"\n' for s in segments)
    return "start,end,text\n" + rows


def render_lrc(segments: list[Segment]) -> str:
    lines = []
    for segment in segments:
        minutes, rest = divmod(segment.t0 * 10, 60_000)
        seconds, milliseconds = divmod(rest, 1000)
        lines.append(f"[{minutes:02d}:{seconds:02d}.{milliseconds // 10:02d}]{segment.text}\n")
    return "[by:whisper.cpp]\n" + "".join(lines)


# Whisper's architecture per size, as whisper.cpp reports it in the JSON's `model`: audio and text
# state width, heads, layers. large-v3 (and its turbo) has 128 mel bands and a 51866-token vocabulary.
_DIMENSIONS = {
    "tiny": (384, 6, 4), "base": (512, 8, 6), "small": (768, 12, 12),
    "medium": (1024, 16, 24), "large": (1280, 20, 32),
}
# ggml's ftype numbers for the compute types faster-whisper uses (int8 is nearest to ggml's q8_0).
_FTYPES = {"float32": 0, "float16": 1, "int8": 7, "int8_float16": 7, "int8_float32": 7, "int8_bfloat16": 7,
           "bfloat16": 1}


def model_block(model: str | None, compute_type: str | None) -> dict:
    """The JSON's `model` object for a faster-whisper model name (or folder), in whisper.cpp's
    fields; sizes that cannot be told from the name read `unknown` with zeros, as whisper.cpp's do."""
    name = (model or "").rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1].lower()
    name = name.removeprefix("faster-whisper-").removeprefix("whisper-")
    size = next((size for size in _DIMENSIONS if name.startswith(size) or f"-{size}" in name), "unknown")
    state, heads, layers = _DIMENSIONS.get(size, (0, 0, 0))
    english = name.endswith(".en")
    v3 = "v3" in name or "turbo" in name
    text_layers = 4 if "turbo" in name else (2 if name.startswith("distil-") else layers)
    return {
        "type": size,
        "multilingual": not english and not name.startswith("distil-medium.en"),
        "vocab": 51864 if english else (51866 if v3 else 51865),
        "audio": {"ctx": 1500, "state": state, "head": heads, "layer": layers},
        "text": {"ctx": 448, "state": state, "head": heads, "layer": text_layers},
        "mels": 128 if v3 else 80,
        "ftype": _FTYPES.get(compute_type or "", 1),
    }


def system_info(result: dict) -> str:
    """The JSON's `systeminfo`: where and how the transcript was made (whisper.cpp lists CPU features)."""
    ran = result.get("executed_on") or {}
    engine = result.get("engine") or {}
    parts = [f"whisperdrop = {__version__}", "faster-whisper = 1", f"route = {ran.get('route', 'local')}"]
    if ran.get("host"):
        parts.append(f"host = {ran['host']}")
    parts.append(f"device = {ran.get('device') or engine.get('device') or 'unknown'}")
    compute_type = ran.get("compute_type") or engine.get("compute_type")
    if compute_type:
        parts.append(f"compute_type = {compute_type}")
    if result.get("fallback_reason"):
        parts.append(f"fallback = {result['fallback_reason']}")
    return " | ".join(parts) + " | "


def _times(t0: int, t1: int) -> dict:
    return {"timestamps": {"from": timestamp(t0, True), "to": timestamp(t1, True)},
            "offsets": {"from": t0 * 10, "to": t1 * 10}}


def render_json(result: dict, segments: list[Segment], *, model_argument: str, language_argument: str,
                translate: bool, full: bool = False) -> str:
    """whisper-cli's JSON (`-oj`): systeminfo, model, params (the -m, -l and -tr given), result.language,
    transcription[] with timestamps, offsets and text. With `full` (`-ojf`), each segment also lists
    `tokens`: here one per word (faster-whisper times words, not tokens), with `id` -1 and `t_dtw` -1."""
    ran = result.get("executed_on") or {}
    compute_type = ran.get("compute_type") or (result.get("engine") or {}).get("compute_type")
    transcription = []
    for segment in segments:
        entry = {**_times(segment.t0, segment.t1), "text": segment.text}
        if full:
            entry["tokens"] = [
                {"text": word["word"], **_times(centiseconds(word["start"]), centiseconds(word["end"])),
                 "id": -1, "p": round(float(word.get("probability", 0.0)), 6), "t_dtw": -1}
                for word in segment.words
            ]
        transcription.append(entry)
    document = {
        "systeminfo": system_info(result),
        "model": model_block(result.get("model"), compute_type),
        "params": {"model": model_argument, "language": language_argument, "translate": translate},
        "result": {"language": result.get("language") or language_argument},
        "transcription": transcription,
    }
    return json.dumps(document, indent="\t", ensure_ascii=False) + "\n"
