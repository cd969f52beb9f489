"""What every `whisperdrop` command shares: its common flags, loading the config, setting up logging.

`commands` (the parser and its dispatch) and each command's own module (`transcribe`, `report`)
use these, so no command module needs the dispatcher that calls it.
"""

from __future__ import annotations

import argparse
import sys

from whisperdrop.shared import config as config_module, log


def load_config(args: argparse.Namespace) -> config_module.Config:
    """The config named by `args.config` (or found as usual), validated. A config that cannot be used
    prints every problem on stderr and raises SystemExit(2)."""
    try:
        return config_module.load(args.config)
    except config_module.ConfigError as error:
        print(f"whisperdrop: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def setup_logging(config: config_module.Config, args: argparse.Namespace, stream=None) -> None:
    """Configure logging from `logging` in the config; `-v` and `--log-format` override it."""
    settings = config.logging
    log.configure(
        level="debug" if getattr(args, "verbose", False) else settings.level,
        fmt=getattr(args, "log_format", None) or settings.format,
        file=settings.file,
        stream=stream,
    )


def add_common(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """Add the flags every command that reads the config takes: -c, -v, --log-format.

    People type them on either side of the command (`whisperdrop -c FILE status` and `whisperdrop
    status -c FILE`), so the top-level parser takes them too (`top_level`, where they get their
    defaults) and a command's parser leaves a flag it was not given unset, so that it does not undo
    the one given before the command."""
    unset = argparse.SUPPRESS
    parser.add_argument("-c", "--config", default=None if top_level else unset, metavar="FILE",
                        help="config file (default: $WHISPERDROP_CONFIG, ./config.yaml, "
                        "~/.config/whisperdrop/config.yaml, /etc/whisperdrop/config.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", default=False if top_level else unset,
                        help="debug logging")
    parser.add_argument("--log-format", choices=("json", "console"), default=None if top_level else unset,
                        help="override logging.format")
