"""The command line: `whisperdrop [-c FILE] COMMAND`, its commands listed in `--help` (`synopsis`).

Heavy modules are imported inside the command that needs them, so `whisperdrop status` starts fast.
Each command is a short function over the layers below (the reports print from `cli.report`;
`transcribe` is `cli.transcribe`; the flags and config loading all share are `cli.common`); the
module is one argument parser and its dispatch.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import textwrap

from whisperdrop import __version__
from whisperdrop.cli.common import add_common, load_config, setup_logging
from whisperdrop.shared import config as config_module, config_checks, config_schema


def _print_problems(headline: str, problems: list[str]) -> None:
    print(headline, file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args)
    # The same check as `check-config`, which writes nothing; the folders are made only once it passes.
    problems = config_checks.check(config, "daemon") or config_checks.make_folders(config)
    if problems:
        _print_problems(f"whisperdrop: cannot start with {config.source or 'the embedded default'}:", problems)
        return 2
    from whisperdrop.daemon.status import DaemonRunning, hold_daemon_lock

    try:
        hold_daemon_lock(config.path("state_dir"))  # held until the process ends, however it ends
    except DaemonRunning as error:
        print(f"whisperdrop: cannot start: {error}", file=sys.stderr)
        return 2
    _warn_insecure(config)
    setup_logging(config, args)
    from whisperdrop.daemon.service import serve

    status = asyncio.run(serve(config))
    # Every stage is committed to the ledger, so a worker thread still inside a long engine window
    # holds nothing worth waiting for: exit now instead of joining it (SIGTERM's 10-second promise).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _warn_insecure(config: config_module.Config) -> None:
    """Print a warning on stderr for each config or key file that others can change (or read), and for
    the API's clients served without a token."""
    for warning in config_checks.insecure_files(config) + config_checks.api_warnings(config):
        print(f"whisperdrop: warning: {warning}", file=sys.stderr)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Check the config as `run` (or, for a runner-only file, `runner`) would, creating nothing: the
    verdict on stdout, the problems on stderr; 0 when it would start, 1 when not, 2 when invalid."""
    config = load_config(args)
    role = config_checks.role(config)
    _warn_insecure(config)
    problems = config_checks.check(config, role)
    source = config.source or "the embedded default (no config file found)"
    command = "whisperdrop runner" if role == "runner" else "whisperdrop run"
    if problems:
        _print_problems(f"{source}: valid, but `{command}` would not start:", problems)
        return 1
    if role == "runner":
        runner = config.runner
        print(f"{source}: OK, a GPU runner config (`{command}`)\n  spool   {runner.spool}\n"
              f"  model   {runner.model} on {runner.device}")
        return 0
    made = " (made on first run)" if config.default_inbox and not config.inbox.exists() else ""
    print(f"{source}: OK (`{command}`)\n  inbox   {config.inbox}{made}\n  outbox  {config.outbox}\n"
          f"  provider {config.transcription.provider}, {len(config.remote.hosts)} GPU host(s), "
          f"local model {config.local.model}")
    return 0


def cmd_default_config(args: argparse.Namespace) -> int:
    sys.stdout.write(config_schema.render_default_yaml())
    return 0


def cmd_runner(args: argparse.Namespace) -> int:
    config = load_config(args)
    problems = config_checks.check(config, "runner")  # what `check-config` says of a runner config
    if problems:
        _print_problems(f"whisperdrop runner: cannot start with {config.source or 'the embedded default'}:", problems)
        return 2
    setup_logging(config, args)
    if config.runner.backend == "slurm":
        from whisperdrop.gpu_runner.slurm_service import main as slurm_main

        return slurm_main(config)
    from whisperdrop.gpu_runner.service import main as runner_main

    return runner_main(config)


def cmd_slurm_task(args: argparse.Namespace) -> int:
    """A compute node's side of the Slurm backend: do one claimed job from the spool (the batch
    script the runner writes calls this; it is no command for people)."""
    config = load_config(args)
    setup_logging(config, args)
    from whisperdrop.gpu_runner.slurm_task import run_task

    settings = dict(config["runner"])
    if args.spool:
        settings["spool"] = os.path.abspath(args.spool)
    return run_task(settings, args.job)


def synopsis(commands: list[str]) -> str:
    """The first lines of `--help`: what whisperdrop does and every command, as `a | b | c`."""
    lead = "whisperdrop [-c FILE] "
    listed = textwrap.fill(" | ".join(commands), width=100 - len(lead), break_on_hyphens=False,
                           subsequent_indent=" " * len(lead), initial_indent="")
    return "Drop audio or video into an inbox folder, get transcripts in an outbox.\n\n" + lead + listed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whisperdrop", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"whisperdrop {__version__}")
    add_common(parser, top_level=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="watch the inbox and transcribe everything that lands there")
    add_common(run)
    run.set_defaults(handler=cmd_run)

    from whisperdrop.cli import transcribe as cli_transcribe

    cli_transcribe.add_parser(commands, add_common)

    check = commands.add_parser("check-config", help="validate the configuration and its folders")
    add_common(check)
    check.set_defaults(handler=cmd_check_config)

    default = commands.add_parser("default-config", help="print the documented default config.yaml")
    default.set_defaults(handler=cmd_default_config)

    runner = commands.add_parser("runner", help="GPU host: transcribe jobs from the spool")
    add_common(runner)
    runner.set_defaults(handler=cmd_runner)

    task = commands.add_parser("slurm-task", help="Slurm compute node: do one job the Slurm runner submitted")
    add_common(task)
    task.add_argument("--spool", help="the spool on the shared file system (default: runner.spool)")
    task.add_argument("--job", required=True, metavar="ID", help="the job id (64 hex digits)")
    task.set_defaults(handler=cmd_slurm_task)

    commands.add_parser("whisper-cli", add_help=False, help="whisper.cpp's whisper-cli, same flags and files "
                        "(see `whisperdrop whisper-cli -h`)")  # main() hands its arguments over before parsing

    from whisperdrop.cli import report as cli_report

    for name, command_help in cli_report.COMMANDS:
        sub = commands.add_parser(name, help=command_help)
        add_common(sub)
        cli_report.add_arguments(name, sub)
        sub.set_defaults(handler=lambda args, name=name: cli_report.run(name, args, load_config(args)))
    parser.description = synopsis(list(commands.choices))
    return parser


def _config_before_whisper_cli(arguments: list[str]) -> tuple[str | None, list[str]] | None:
    """For `whisperdrop [-c FILE] whisper-cli ARGS...`: (the -c given or None, ARGS); None when the
    command is another one. whisper.cpp's flags are not ours, so the drop-in gets ARGS unparsed."""
    if "whisper-cli" not in arguments:
        return None
    index = arguments.index("whisper-cli")
    before = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    before.add_argument("-c", "--config")
    try:
        known, unknown = before.parse_known_args(arguments[:index])
    except argparse.ArgumentError:
        return None
    return None if unknown else (known.config, arguments[index + 1:])


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    drop_in = _config_before_whisper_cli(arguments)
    if drop_in is not None:  # whisper.cpp's flags, not ours: all of them go to the drop-in
        from whisperdrop.cli.whisper_cli import main as whisper_cli_main

        config_file, rest = drop_in
        if config_file:  # the drop-in finds its config as always, $WHISPERDROP_CONFIG first
            os.environ[config_module.ENV_VAR] = config_file
        return whisper_cli_main(rest)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.handler(args)
        sys.stdout.flush()  # inside the try: a reader that went away (`| head -1`) is seen here
        return status
    except KeyboardInterrupt:
        print("\nwhisperdrop: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout closed it (`whisperdrop status | head -1`): that is its choice, not an
        # error worth a traceback. Point stdout at /dev/null so the interpreter's final flush is quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # what a shell reports for a command ended by SIGPIPE


def runner_main(argv: list[str] | None = None) -> int:
    """`whisperdrop-runner`: shorthand for `whisperdrop runner`."""
    return main(["runner", *(argv if argv is not None else sys.argv[1:])])
