"""`whisperdrop whisper-cli` and `whisperdrop-whisper-cli`: a drop-in for whisper.cpp's `whisper-cli`.

An application that runs `whisper-cli -m models/ggml-large-v3.bin -l pt -oj -of out -f talk.wav`
swaps the binary's path and gets the same files (`out.json`, `<input>.srt`...) and the same printed
transcript, made by whisperdrop's one-shot transcription: a GPU host first, the local CPU as the
fallback. whisper-cli's common flags are honoured; the rest of its flags are accepted and each one
named in a warning on stderr; an unknown flag is a usage error (the flags: `whisper_cli_flags`). The
config is found as always ($WHISPERDROP_CONFIG, ./config.yaml, ~/.config/whisperdrop/config.yaml,
/etc/whisperdrop/config.yaml).

Once the flags are parsed, `run` finds the config, turns the flags into TranscribeOptions,
transcribes each file with the one-shot transcription and writes whisper-cli's files and printed
transcript (`outputs.whisper_cpp`). A flag given overrides the config; a flag not given takes the
config's value (`transcription.model`, `language`, `initial_prompt`, `beam_size`), not whisper-cli's
built-in default.

Exit status: 0 when every file was transcribed, 1 when one failed (the others are still done), 2 on
a usage or config error, 3 when the model cannot be used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from whisperdrop.cli.whisper_cli_flags import PROG, Params, UsageError, map_model, parse, usage
from whisperdrop.outputs import whisper_cpp as output
from whisperdrop.shared import config as config_module, log

AUTO = "auto"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _languages() -> frozenset[str]:
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    return frozenset(_LANGUAGE_CODES)


def options_for(params: Params, config: config_module.Config):
    """The TranscribeOptions for `params` over the config's, and the warnings they bring; `-m` is
    written into `config` as local.model too. Raises UsageError for an unknown model (status 3) or
    language (status 2)."""
    from whisperdrop.shared import profiles
    from whisperdrop.shared.model_names import english_only

    warnings: list[str] = []
    base = profiles.base_options(config)
    model = base.model
    if params.model is not None:
        model, warnings = map_model(params.model, (base.model, config.local.model))
        config["local"]["model"] = model  # -m holds on every route, as `transcribe --model` does
    if config.transcription.provider == "local" or not config.remote.hosts:
        model = config.local.model  # every job runs here: the model the router plans with
    language = params.language if params.language is not None else (base.language or AUTO)
    if language != AUTO and language not in _languages():
        raise UsageError(f"error: unknown language '{language}'")
    task = "translate" if params.translate else base.task
    if english_only(model) and ((language not in ("en", AUTO)) or task == "translate"):
        warnings.append(f"{PROG}: warning: model {model} is not multilingual, ignoring language and translation "
                        "options (as whisper-cli does); give a multilingual model with -m, e.g. ggml-large-v3.bin")
        language, task = "en", "transcribe"
    overrides = {"model": model, "language": language, "task": task, "word_timestamps": True}
    if params.prompt is not None:
        overrides["initial_prompt"] = params.prompt or None
    if params.beam_size is not None:
        overrides["beam_size"] = params.beam_size
    return profiles.apply(base, overrides, "whisper-cli flags"), warnings


def run(params: Params) -> int:
    """Transcribe `params.files` as whisper-cli would; returns the exit status (see the module's doc)."""
    try:
        config = config_module.load(None)
    except config_module.ConfigError as error:
        _say(f"{PROG}: {error}")
        return 2
    try:
        options, warnings = options_for(params, config)
    except UsageError as error:
        _say(str(error))
        if error.usage:
            sys.stderr.write(usage())
        return error.status
    for warning in params.warnings + warnings:
        _say(warning)
    log.configure(level="error" if params.no_prints else "warning", fmt="console", stream=sys.stderr)
    if params.threads:
        config["local"]["threads"] = params.threads  # the local fallback's engine; a GPU host uses its own

    failed = 0
    inputs: list[tuple[str, str]] = []  # (input as given, output path without extension)
    for index, name in enumerate(params.files):
        if name == "-":
            _say("error: reading audio from stdin ('-') is not supported; save it to a file and give its path")
            failed += 1
        elif not os.path.exists(name):
            _say(f"error: input file not found '{name}'")
            failed += 1
        else:
            given = params.output_files[index] if index < len(params.output_files) else ""
            inputs.append((name, given or name))
    if not inputs:
        if not failed:
            _say("error: no input files specified")
            sys.stderr.write(usage())
            return 2
        return 1
    language_argument = options.language or AUTO
    for name, base in inputs:
        if not params.no_prints:
            _say(f"\nmain: processing '{name}', model = {options.model}, lang = {language_argument}, "
                 f"task = {options.task}, beam size = {options.beam_size}, timestamps = {0 if params.no_timestamps else 1} ...")
        result, problem = transcribe(config, Path(name), options, params)
        if result is None:
            _say(f"error: failed to process audio file '{name}': {problem}")
            failed += 1
            continue
        if not write_outputs(params, result, name, base, language_argument):
            failed += 1
    return 1 if failed else 0


def write_outputs(params: Params, result: dict, name: str, base: str, language_argument: str) -> bool:
    """Print the transcript of `result` and write the files `params` asks for at `base`.EXT; False
    when a file could not be written (the reason on stderr)."""
    segments = output.segments_of(result, params.max_len)
    sys.stdout.write(output.printed(segments, params.no_timestamps))
    sys.stdout.flush()
    if not params.no_prints:
        ran = result.get("executed_on") or {}
        where = f"GPU host {ran['host']}" if ran.get("route") == "remote" else "the local CPU"
        note = f" (fallback: {result['fallback_reason']})" if result.get("fallback_reason") else ""
        _say(f"{PROG}: '{name}' transcribed on {where} with {result.get('model')}{note}")
    renderers = {
        "txt": lambda: output.render_txt(segments),
        "vtt": lambda: output.render_vtt(segments),
        "srt": lambda: output.render_srt(segments, params.offset_n),
        "csv": lambda: output.render_csv(segments),
        "json": lambda: output.render_json(result, segments, model_argument=params.model or result.get("model") or "",
                                           language_argument=language_argument, translate=params.translate,
                                           full=params.json_full),
        "lrc": lambda: output.render_lrc(segments),
    }
    written = True
    for extension in params.formats:
        path = f"{base}.{extension}"
        try:
            with open(path, "w", encoding="utf-8") as stream:
                stream.write(renderers[extension]())
        except OSError as error:
            _say(f"output_{extension}: failed to open '{path}' for writing: {error.strerror}; "
                 "give -of a path in a folder this user can write")
            written = False
            continue
        if not params.no_prints:
            _say(f"output_{extension}: saving output to '{path}'")
    return written


class ProgressPrinter:
    """-pp: whisper-cli's progress lines on stderr, one each time another PROGRESS_STEP percent is done."""

    PROGRESS_STEP = 5  # whisper-cli's progress_step

    def __init__(self):
        self.shown = 0

    def __call__(self, done: float, duration: float) -> None:
        percent = min(100, int(100 * done / duration)) if duration else 100
        if percent >= self.shown + self.PROGRESS_STEP:
            self.shown = percent - percent % self.PROGRESS_STEP
            _say(f"whisper_print_progress_callback: progress = {percent:3d}%")


def transcribe(config, path: Path, options, params: Params) -> tuple[dict | None, str | None]:
    """The Result of `path` with `options` (a GPU host first, then the local CPU), or None and why.
    Ctrl-C ends the process at once with 130, as `whisperdrop transcribe` does (nothing half-written)."""
    from whisperdrop.cli.oneshot import transcribe_one

    result, problem = transcribe_one(config, path, options,
                                     progress=ProgressPrinter() if params.print_progress else None)
    if result is None and problem == "interrupted":
        _say(f"{PROG}: interrupted")
        sys.stdout.flush()
        os._exit(130)  # an engine thread may still be running: do not wait for it
    if problem:  # the one-shot's hint names `whisperdrop transcribe`; here the command is whisper-cli's
        problem = problem.replace("run `whisperdrop transcribe` on it again", "run this command again")
    return result, problem


def main(argv: list[str] | None = None) -> int:
    """Run whisper-cli's command line `argv` (default: sys.argv[1:]); returns the exit status."""
    try:
        params = parse(list(sys.argv[1:] if argv is None else argv))
    except UsageError as error:
        print(error, file=sys.stderr)
        if error.usage:
            sys.stderr.write(usage())
        return error.status
    if params.help:
        sys.stderr.write(usage())
        return 0
    try:
        return run(params)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
