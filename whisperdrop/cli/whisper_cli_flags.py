"""whisper.cpp's `whisper-cli` command line, as the drop-in (`cli.whisper_cli`) reads it.

`parse(argv)` returns `Params`: the honoured flags (HONOURED) in whisper-cli's terms, and a warning
for each flag that is accepted and not honoured (IGNORED). `map_model` turns a ggml file name into a
faster-whisper model name; `usage()` is the help text. Raises UsageError for what whisper-cli would
not accept either (an unknown flag, a missing value, no input file).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

PROG = "whisperdrop-whisper-cli"

# faster-whisper's model names (faster_whisper.utils._MODELS), which whisper.cpp's ggml file names map onto.
FASTER_WHISPER_MODELS = (
    "tiny.en", "tiny", "base.en", "base", "small.en", "small", "medium.en", "medium", "large-v1", "large-v2",
    "large-v3", "large", "distil-large-v2", "distil-medium.en", "distil-small.en", "distil-large-v3",
    "distil-large-v3.5", "large-v3-turbo", "turbo",
)
_QUANTIZED = re.compile(r"-(q\d(?:_\d|_k)?|f16|f32)$")  # ggml-large-v3-q5_0.bin


class UsageError(Exception):
    """Command-line arguments whisper-cli would not accept either; `status` is the exit status."""

    def __init__(self, message: str, status: int = 2, usage: bool = True):
        super().__init__(message)
        self.status, self.usage = status, usage


# The flags whisperdrop honours: (short, long, attribute, kind). kind: "int", "str", "list", "flag",
# or "output" (a file to write: the attribute is added to `Params.outputs`).
HONOURED = (
    ("-t", "--threads", "threads", "int"),
    ("-on", "--offset-n", "offset_n", "int"),
    ("-ml", "--max-len", "max_len", "int"),
    ("-bs", "--beam-size", "beam_size", "int"),
    ("-tr", "--translate", "translate", "flag"),
    ("-sow", "--split-on-word", "split_on_word", "flag"),
    ("-otxt", "--output-txt", "txt", "output"),
    ("-ovtt", "--output-vtt", "vtt", "output"),
    ("-osrt", "--output-srt", "srt", "output"),
    ("-olrc", "--output-lrc", "lrc", "output"),
    ("-ocsv", "--output-csv", "csv", "output"),
    ("-oj", "--output-json", "json", "output"),
    ("-ojf", "--output-json-full", "json_full", "output"),
    ("-of", "--output-file", "output_files", "list"),
    ("-np", "--no-prints", "no_prints", "flag"),
    ("-pp", "--print-progress", "print_progress", "flag"),
    ("-nt", "--no-timestamps", "no_timestamps", "flag"),
    ("-l", "--language", "language", "str"),
    (None, "--prompt", "prompt", "str"),
    ("-m", "--model", "model", "str"),
    ("-f", "--file", "files", "list"),
)

# whisper-cli's other flags: accepted, not honoured, each named in a warning with the reason.
# (short, long, takes a value, why it is not honoured)
_DECODING = "faster-whisper decodes with whisperdrop's own settings"
IGNORED = (
    ("-p", "--processors", True, "one process decodes each file (on the GPU host, or on the local CPU)"),
    ("-ot", "--offset-t", True, "the whole file is transcribed"),
    ("-d", "--duration", True, "the whole file is transcribed"),
    ("-mc", "--max-context", True, _DECODING),
    ("-bo", "--best-of", True, _DECODING),
    ("-ac", "--audio-ctx", True, "the full audio context is always used"),
    ("-wt", "--word-thold", True, "word timings come from faster-whisper's alignment"),
    ("-et", "--entropy-thold", True, _DECODING),
    ("-lpt", "--logprob-thold", True, _DECODING),
    ("-nth", "--no-speech-thold", True, _DECODING),
    ("-tp", "--temperature", True, _DECODING),
    ("-tpi", "--temperature-inc", True, _DECODING),
    ("-debug", "--debug-mode", False, "there is no debug dump"),
    ("-di", "--diarize", False, "no speaker labels are made"),
    ("-tdrz", "--tinydiarize", False, "no speaker labels are made"),
    ("-nf", "--no-fallback", False, _DECODING),
    ("-owts", "--output-words", False, "no karaoke script is written"),
    ("-fp", "--font-path", True, "no karaoke script is written"),
    ("-ps", "--print-special", False, "special tokens are not kept"),
    ("-pc", "--print-colors", False, "the transcript is printed without colours"),
    ("-dl", "--detect-language", False, "the whole file is transcribed, its language detected when -l is auto"),
    ("-oved", "--ov-e-device", True, "there is no OpenVINO encoder"),
    ("-dtw", "--dtw", True, "word timings are always on (faster-whisper's alignment)"),
    ("-ls", "--log-score", False, "no score file is written"),
    ("-ng", "--no-gpu", False, "whisperdrop chooses the route: a GPU host first, then the local CPU"),
    ("-fa", "--flash-attn", False, "the GPU host's engine settings apply"),
    ("-sns", "--suppress-nst", False, _DECODING),
    (None, "--suppress-regex", True, _DECODING),
    (None, "--grammar", True, "grammars are not supported by faster-whisper"),
    (None, "--grammar-rule", True, "grammars are not supported by faster-whisper"),
    (None, "--grammar-penalty", True, "grammars are not supported by faster-whisper"),
)


@dataclass
class Params:
    """The parsed command line, in whisper-cli's terms; `warnings` are the lines to print on stderr."""

    files: list[str] = field(default_factory=list)
    output_files: list[str] = field(default_factory=list)
    model: str | None = None
    language: str | None = None  # None: the config's (whisper-cli's own default, en, does not apply)
    prompt: str | None = None
    threads: int | None = None
    offset_n: int = 0
    max_len: int = 0
    beam_size: int | None = None
    translate: bool = False
    split_on_word: bool = False
    outputs: set[str] = field(default_factory=set)  # "txt", "vtt", "srt", "lrc", "csv", "json", "json_full"
    no_prints: bool = False
    print_progress: bool = False
    no_timestamps: bool = False
    help: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def formats(self) -> list[str]:
        """The extensions to write, in the order whisper-cli writes them (-ojf implies -oj)."""
        wanted = self.outputs | ({"json"} if self.json_full else set())
        return [extension for extension in ("txt", "vtt", "srt", "csv", "json", "lrc") if extension in wanted]

    @property
    def json_full(self) -> bool:
        return "json_full" in self.outputs


def parse(argv: list[str]) -> Params:
    """Parse whisper-cli's arguments (`argv` without the program name). A lone `@FILE` reads the
    arguments from FILE, one a line, as whisper-cli does. Raises UsageError."""
    if len(argv) == 1 and argv[0].startswith("@"):
        try:
            argv = Path(argv[0][1:]).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise UsageError(f"error: response file '{argv[0][1:]}' not found ({error.strerror})", 1, False) from None
    honoured = {name: entry for entry in HONOURED for name in entry[:2] if name}
    ignored = {name: entry for entry in IGNORED for name in entry[:2] if name}
    params = Params()
    index = 0
    while index < len(argv):
        argument = argv[index]
        index += 1
        if argument == "-" or not argument.startswith("-"):
            params.files.append(argument)
            continue
        if argument in ("-h", "--help"):
            params.help = True
            return params

        def value() -> str:
            nonlocal index
            if index >= len(argv):
                raise UsageError(f"error: argument {argument} requires value")
            index += 1
            return argv[index - 1]

        if argument in honoured:
            _short, _long, attribute, kind = honoured[argument]
            if kind == "flag":
                setattr(params, attribute, True)
            elif kind == "output":
                params.outputs.add(attribute)
            elif kind == "list":
                getattr(params, attribute).append(value())
            elif kind == "int":
                text = value()
                try:
                    setattr(params, attribute, int(text))
                except ValueError:
                    raise UsageError(f"error: argument {argument} needs a whole number, not '{text}'") from None
            else:
                setattr(params, attribute, value())
        elif argument in ignored:
            short, long, takes_value, why = ignored[argument]
            if takes_value:
                value()
            shown = f"{short} ({long})" if short else long
            params.warnings.append(f"{PROG}: warning: {shown} is not honoured: {why}")
        else:
            raise UsageError(f"error: unknown argument: {argument}")
    if params.language is not None:
        params.language = params.language.lower()
    if params.max_len < 0:
        raise UsageError(f"error: argument -ml needs 0 or more characters, not {params.max_len}")
    if params.beam_size is not None and params.beam_size < 1:
        raise UsageError(f"error: argument -bs needs a beam size of 1 or more, not {params.beam_size}")
    if params.threads is not None and params.threads < 0:
        raise UsageError(f"error: argument -t needs 0 or more threads, not {params.threads}")
    if params.max_len and not params.split_on_word:
        params.warnings.append(f"{PROG}: warning: -ml (--max-len) cuts segments between words, never inside one "
                               "(as with -sow): faster-whisper times words, not tokens")
    if params.json_full:
        params.warnings.append(f"{PROG}: warning: -ojf (--output-json-full) lists words as `tokens` "
                               "(id -1, t_dtw -1): faster-whisper times words, not tokens")
    return params


def map_model(argument: str, configured: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """The faster-whisper model for whisper-cli's `-m` and the warnings it brings.

    `ggml-large-v3.bin` (or a path ending in it; a quantized `ggml-large-v3-q5_0.bin` too) becomes
    `large-v3`; a faster-whisper name or `bundled:tiny.en` stays; a folder (a CTranslate2 model) is
    used as it is. A name `configured` holds as `bundled:NAME` (the config's models) becomes that. Raises UsageError
    (status 3, whisper-cli's for a model it cannot load) for anything else.
    """
    warnings = []
    if argument.startswith("bundled:") or argument in FASTER_WHISPER_MODELS:
        name = argument
    elif os.path.isdir(argument):
        return str(Path(argument).resolve()), warnings
    else:
        stem = os.path.basename(argument)
        stem = stem[:-4] if stem.endswith(".bin") else stem
        stem = stem.removeprefix("ggml-")
        quantized = _QUANTIZED.search(stem)
        if quantized:
            stem = stem[:quantized.start()]
            warnings.append(f"{PROG}: warning: -m {argument}: the {quantized.group(1)} weights are not used; "
                            f"the GPU host runs faster-whisper's {stem} with its configured compute_type")
        if stem not in FASTER_WHISPER_MODELS:
            raise UsageError(
                f"error: -m {argument}: not a whisper.cpp model whisperdrop knows. Give a whisper.cpp file name "
                f"(ggml-<name>.bin, e.g. ggml-large-v3.bin), a faster-whisper name ({', '.join(FASTER_WHISPER_MODELS)}), "
                "bundled:tiny.en, or a CTranslate2 model folder", status=3, usage=False)
        name = stem
    if f"bundled:{name}" in configured:
        name = f"bundled:{name}"
    return name, warnings


_HELP = {
    "threads": "threads of the local fallback (a GPU host uses its own)",
    "offset_n": "number the SRT's segments from N + 1",
    "max_len": "maximum segment length in characters (cut between words)",
    "beam_size": "beam size (default: transcription.beam_size)",
    "translate": "translate to English (needs a multilingual model)",
    "split_on_word": "split on words (always so here)",
    "txt": "write <input>.txt", "vtt": "write <input>.vtt", "srt": "write <input>.srt",
    "lrc": "write <input>.lrc", "csv": "write <input>.csv", "json": "write <input>.json",
    "json_full": "write <input>.json with each segment's words as `tokens`",
    "output_files": "output path without extension, one per input file",
    "no_prints": "print nothing but the transcript (and warnings, errors)",
    "print_progress": "print progress on stderr",
    "no_timestamps": "print the transcript without timestamps",
    "language": "spoken language, or auto (default: transcription.language)",
    "prompt": "initial prompt (default: transcription.initial_prompt)",
    "model": "ggml-<name>.bin (or its path), a faster-whisper name or folder (default: transcription.model)",
    "files": "input audio or video file",
}


def usage() -> str:
    """The help text: the flags honoured and those accepted with a warning."""
    lines = ["", f"usage: {PROG} [options] file0 file1 ...",
             "whisper.cpp's whisper-cli, run by whisperdrop (a GPU host first, the local CPU as fallback).",
             "Any audio or video file PyAV can read. The config: $WHISPERDROP_CONFIG or the usual search path.",
             "", "options:", "  -h,        --help"]
    for short, long, attribute, kind in HONOURED:
        takes = "" if kind == "flag" else " N" if kind == "int" else " FNAME" if kind == "list" else " VALUE"
        names = f"  {(short + ',') if short else '':<10} {long}{takes}"
        lines.append(f"{names:<34} {_HELP[attribute]}")
    lines.append("")
    lines.append("accepted and not honoured (a warning names each one used):")
    names = [f"{short}/{long}" if short else long for short, long, _value, _why in IGNORED]
    lines.append("  " + " ".join(names))
    return "\n".join(lines) + "\n"
