"""`whisperdrop transcribe FILE... [-o DIR] [--model --language --prompt --hotwords --task --format --profile]`:
the daemon's extract, route and outbox stages over the files given, now; the sources stay where they are.

The flags override the config for this run, over the profile named by `--profile` (see
`whisperdrop.shared.profiles`). The paths written go to stdout, one per line (the formats asked for, then
`<stem>.json`, which is always written: it is the Result, and its presence means the set is whole);
progress and messages go to stderr. The run itself (Ctrl-C, progress, what is written) is
`whisperdrop.cli.oneshot`'s; this module is the command's flags and what they plan.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any, Callable

from whisperdrop.cli.common import load_config
from whisperdrop.cli.oneshot import OneShot, writer
from whisperdrop.shared import config as config_module, log
from whisperdrop.shared.profiles import OUTPUT_FORMATS, Plan, ProfileError
from whisperdrop.shared.spool import TASKS

FORMAT_CHOICES = ("json",) + OUTPUT_FORMATS


def add_parser(commands: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the `transcribe` command and its flags to the CLI's subparsers."""
    parser = commands.add_parser("transcribe", help="transcribe files now, through the same stages",
                                 description=__doc__.split("\n\n")[1].replace("\n", " "))
    add_common(parser)
    parser.add_argument("files", nargs="+", metavar="FILE")
    parser.add_argument("-o", "--output", default=".", metavar="DIR", help="where the outputs go (default: .)")
    parser.add_argument("--profile", metavar="NAME", help="use this profile of the config (its options and outputs)")
    parser.add_argument("--model", help="model for this run, on every route (a faster-whisper name, a CTranslate2 "
                        "folder, bundled:tiny.en); default: transcription.model, local.model on this machine")
    parser.add_argument("--language", metavar="CODE", help="language code (en, de, pt...), or `auto` to detect it")
    parser.add_argument("--prompt", metavar="TEXT", help="initial prompt: your vocabulary and style")
    parser.add_argument("--hotwords", metavar="WORDS", help="words to favour (names, jargon), space separated")
    parser.add_argument("--task", choices=TASKS, help="`translate` writes English (needs a multilingual model)")
    parser.add_argument("--format", action="append", metavar="FMT", dest="formats",
                        help=f"output format, repeatable or comma-separated: {', '.join(FORMAT_CHOICES)} "
                        "(json is always written; default: transcription.outputs)")
    parser.set_defaults(handler=cmd_transcribe)


def _formats(values: list[str] | None) -> list[str] | None:
    """The --format values, split at commas and checked; None when none was given. Raises ProfileError."""
    if not values:
        return None
    formats = [item.strip().lower() for value in values for item in value.split(",") if item.strip()]
    bad = [item for item in formats if item not in FORMAT_CHOICES]
    if bad:
        raise ProfileError(f"--format {', '.join(bad)}: not a format this writes; choose from {', '.join(FORMAT_CHOICES)}")
    return formats


def plan_for(config: config_module.Config, args: argparse.Namespace) -> tuple[config_module.Config, Plan]:
    """The config for this run (with `--model` as local.model too, so the flag holds on every route)
    and the Plan of its files: transcription, then `--profile`, then the flags. Raises ProfileError
    for an unknown profile or format, or translate with an English-only model."""
    from whisperdrop.daemon.local import LocalTranscriber
    from whisperdrop.daemon.route import Router
    from whisperdrop.shared import profiles

    if args.language not in (None, profiles.AUTO_LANGUAGE):
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        if args.language not in _LANGUAGE_CODES:
            raise ProfileError(f"--language {args.language}: not a language code Whisper knows; give one such as "
                               "en, de, fr, pt, or auto to detect it")
    overrides = {"model": args.model, "language": args.language, "initial_prompt": args.prompt,
                 "hotwords": args.hotwords, "task": args.task, "outputs": _formats(args.formats)}
    if args.model:
        config["local"]["model"] = args.model
    local = LocalTranscriber(config.local)  # its engine loads nothing until asked
    try:
        router = Router(config, local, remote=object() if config.remote.hosts else None)  # planning only
        plan = profiles.plan(config, profile=args.profile, planned=router.planned_options,
                             overrides={key: value for key, value in overrides.items() if value is not None})
        fallback = local.options_for(plan.options)  # where a GPU host is asked, the fallback must manage it too
    finally:
        local.shutdown()
    problem = profiles.capability_problem(plan.options)
    if problem is None and router.provider != "remote" and profiles.capability_problem(fallback):
        problem = profiles.capability_problem(fallback) + " (local.model: the fallback on this machine)"
    if problem:
        raise ProfileError(problem, hint="give --model a multilingual model, e.g. --model bundled:base")
    return config, plan


def cmd_transcribe(args: argparse.Namespace) -> int:
    config = load_config(args)
    try:
        config, plan = plan_for(config, args)
    except ProfileError as error:
        print(f"whisperdrop transcribe: {error}", file=sys.stderr)
        return 2
    output = Path(args.output)
    problem = _prepare_output(output)
    if problem:
        print(f"whisperdrop transcribe: {problem}", file=sys.stderr)
        return 2
    # Progress and results go to the terminal; log events only when asked (--log-format) or on warnings.
    log.configure(level="info" if args.log_format else "warning", fmt=args.log_format or "console", stream=sys.stderr)
    run = OneShot(config, [Path(name) for name in args.files], plan.options, writer(config, output, plan))
    status = asyncio.run(run.main())
    if run.interrupted:
        # A stopped engine or extraction may still run in an executor thread: joining it would keep
        # going for as long as it takes (and a second Ctrl-C during the interpreter's teardown can
        # crash it). Nothing is left half-written: outputs are written whole or not at all.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _prepare_output(output: Path) -> str | None:
    """Make the output folder; what stops it (a file of that name, a folder that cannot be made or
    written), or None."""
    if output.exists() and not output.is_dir():
        return f"-o {output}: that is a file; give -o a folder (made if missing)"
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot create the output folder {output}: {error.strerror}"
    if not os.access(output, os.W_OK | os.X_OK):
        return f"the output folder {output} is not writable by this user"
    return None
