"""Configuration: one schema with every option's type, default and description.

`load(path)` finds the file, checks it against `SCHEMA` and returns a `Config`. Every problem is
collected with its key path (`At 'watch.settle_seconds': ...`) and raised at once as `ConfigError`,
before anything runs. The shipped `config.yaml` is generated from the same schema's defaults (a test
checks that they agree).

Longer than most modules because the schema is one table, every option once with its type, default
and description; splitting it by section would scatter what `check-config` and the docs read whole.
"""

from __future__ import annotations

import difflib
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

ENV_VAR = "WHISPERDROP_CONFIG"


def search_path() -> list[Path]:
    """Where a config file is looked for, first match wins (after `-c` and $WHISPERDROP_CONFIG)."""
    return [
        Path.cwd() / "config.yaml",
        Path.home() / ".config" / "whisperdrop" / "config.yaml",
        Path("/etc/whisperdrop/config.yaml"),
    ]


class ConfigError(Exception):
    """A config file that cannot be used; `problems` lists every reason, each with its key path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the configuration:\n{lines}")


@dataclass(frozen=True)
class Option:
    """One leaf of the schema: its type, default, description and an optional extra check."""

    kind: Any  # a type, or a tuple of types
    default: Any
    description: str
    choices: tuple = ()
    check: Callable[[Any], str | None] | None = None  # returns what was expected, or None
    nullable: bool = False


@dataclass(frozen=True)
class ListOf:
    """A list whose items are each checked against a section schema."""

    item: dict
    default: list
    description: str
    required: tuple = ()  # keys every item must set
    noun: str = "item"  # what an item is called in messages ("host", "profile")
    example: dict = field(default_factory=dict)  # values shown in the commented example of config.yaml


def _positive(value: Any) -> str | None:
    return None if value > 0 else "a number greater than 0"


def _not_negative(value: Any) -> str | None:
    return None if value >= 0 else "a number of 0 or more"


def _seconds(default: float, description: str, zero_ok: bool = False) -> Option:
    """A duration in seconds: a number above 0 (or 0 and above, where 0 means off or at once)."""
    return Option(NUMBER, default, description, check=_not_negative if zero_ok else _positive)


def _port(value: Any) -> str | None:
    return None if 0 < value < 65536 else "a TCP port from 1 to 65535"


def _bitrate(value: Any) -> str | None:
    return None if 6 <= value <= 256 else "an Opus bitrate in kbit/s from 6 to 256"


def _outputs(value: Any) -> str | None:
    bad = [item for item in value if item not in ("srt", "vtt", "txt")]
    return f"a list drawn from srt, vtt, txt (not {', '.join(map(str, bad))})" if bad else None


def _strings(value: Any) -> str | None:
    return None if all(isinstance(item, str) for item in value) else "a list of strings"


NUMBER = (int, float)

HOST = {
    "name": Option(str, None, "A short name for the host, used in logs, the Result and `status`."),
    "host": Option(str, None, "Address or ~/.ssh/config alias of the GPU host."),
    "port": Option(int, 22, "SSH port.", check=_port),
    "user": Option(str, None, "SSH user; default from ~/.ssh/config, else the local user.", nullable=True),
    "key": Option(str, None, "Private key file; default: ssh-agent and the usual ~/.ssh/id_* keys.", nullable=True),
    "known_hosts": Option(
        str, None, "known_hosts file used to verify the host key; default ~/.ssh/known_hosts. Never auto-accepted.",
        nullable=True,
    ),
    "spool": Option(str, "spool", "The spool directory as the SFTP session sees it (relative to its home or chroot)."),
}

def _globs(value: Any) -> str | None:
    if not isinstance(value, list) or not value or not all(isinstance(item, str) and item for item in value):
        return "a non-empty list of glob patterns (e.g. ['bjj/**'])"
    return None


def _events(value: Any) -> str | None:
    return None if all(item in ("done", "failed") for item in value) else "a list of: done, failed"


def _http_url(value: Any) -> str | None:
    scheme, _, rest = value.partition("://")
    return None if scheme in ("http", "https") and rest.split("/")[0] else "an http:// or https:// URL"


def _listen(value: Any) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "HOST:PORT, e.g. 127.0.0.1:8765"
    return None


PROFILE = {
    "name": Option(str, None, "The profile's name, shown in the Result and usable by the API and `transcribe --profile`."),
    "match": Option(
        list, None, "Glob patterns of inbox paths (relative, '/'-separated; `**` spans folders), e.g. ['bjj/**'].",
        check=_globs, nullable=True,
    ),
    # Every override is null by default: null keeps the `transcription` value.
    "model": Option(str, None, "Overrides transcription.model.", nullable=True),
    "language": Option(str, None, "Overrides transcription.language; `auto` detects it.", nullable=True),
    "task": Option(str, None, "Overrides transcription.task.", choices=("transcribe", "translate"), nullable=True),
    "initial_prompt": Option(str, None, "Overrides transcription.initial_prompt.", nullable=True),
    "hotwords": Option(str, None, "Overrides transcription.hotwords.", nullable=True),
    "word_timestamps": Option(bool, None, "Overrides transcription.word_timestamps.", nullable=True),
    "vad_filter": Option(bool, None, "Overrides transcription.vad_filter.", nullable=True),
    "beam_size": Option(int, None, "Overrides transcription.beam_size.", check=_positive, nullable=True),
    "outputs": Option(list, None, "Overrides transcription.outputs.", check=_outputs, nullable=True),
}

SCHEMA: dict[str, Any] = {
    "inbox": Option(str, "inbox", "Folder watched for new media. Relative paths resolve against the config file's folder."),
    "outbox": Option(str, "outbox", "Where transcripts are written; subfolders of the inbox are mirrored."),
    "archive": Option(str, "archive", "Where a source goes once its transcript is safely in the outbox (policy `archive`)."),
    "failed": Option(str, "failed", "Where a source with a permanent error goes, beside `<name>.error.json`."),
    "state_dir": Option(str, "state", "The ledger (SQLite) and work files: extracted audio, results not yet written."),
    "after_success": Option(
        str, "archive", "What happens to a source once its outputs are written: `archive`, `keep` or `delete`.",
        choices=("archive", "keep", "delete"),
    ),
    "max_attempts": Option(
        int, 5, "Tries at a job that keeps failing with an unexpected error before its source goes to `failed/` "
        "beside the error. File-system errors and a missing model are retried until fixed.", check=_positive,
    ),
    "results_days": Option(
        NUMBER, 30.0, "Days a finished job's Result stays in state_dir/results, so the same file dropped again "
        "is not transcribed again; 0 keeps them for ever.", check=_not_negative,
    ),
    "watch": {
        "settle_seconds": _seconds(2.0, "A file is taken once it has not changed for this long.", zero_ok=True),
        "rescan_seconds": _seconds(60.0, "Full rescan of the inbox, behind the inotify events."),
        "recursive": Option(bool, True, "Watch subfolders too (mirrored into the outbox)."),
        "ignore": Option(
            list, ["*.part", "*.tmp", "*~", ".*", "*.crdownload", "*.partial", "*.swp"],
            "Glob patterns of names that are never taken (temporary names wait until renamed).", check=_strings,
        ),
    },
    "audio": {
        "bitrate_kbps": Option(int, 24, "Opus bitrate for the extracted 16 kHz mono audio.", check=_bitrate),
    },
    "transcription": {
        "provider": Option(
            str, "auto", "`auto`: a GPU host, falling back to the local CPU; `remote`: wait for a host; `local`: CPU only.",
            choices=("auto", "remote", "local"),
        ),
        "model": Option(str, "bundled:tiny.en", "Model asked of the GPU host: a faster-whisper name (large-v3), a CTranslate2 folder, or bundled:tiny.en."),
        "language": Option(str, None, "Language code (en, de, ...); null detects it.", nullable=True),
        "initial_prompt": Option(str, None, "Text that primes the model with your vocabulary and style.", nullable=True),
        "hotwords": Option(str, None, "Words to favour (names, jargon), space separated.", nullable=True),
        "word_timestamps": Option(bool, True, "Timestamps for every word in the Result."),
        "vad_filter": Option(bool, True, "Skip silence with the Silero VAD before transcribing."),
        "beam_size": Option(int, 5, "Beam search width.", check=_positive),
        "outputs": Option(list, ["srt", "vtt", "txt"], "Formats written beside `<stem>.json`.", check=_outputs),
        "task": Option(
            str, "transcribe", "`transcribe` keeps the spoken language; `translate` writes English.",
            choices=("transcribe", "translate"),
        ),
    },
    "profiles": ListOf(
        PROFILE, [], "Per-folder options: the first profile whose `match` fits a file's inbox path overrides "
        "`transcription` for it (API requests and `transcribe --profile` can name one).",
        required=("name", "match"), noun="profile",
        example={"name": "bjj", "match": ["bjj/**"], "language": "en",
                 "initial_prompt": "Jiu-jitsu class: guard pass, kimura, berimbolo, de la Riva.",
                 "hotwords": "kimura berimbolo omoplata"},
    ),
    "subtitles": {
        "max_line_chars": Option(int, 42, "Longest line of an SRT or VTT cue, in characters.", check=_positive),
        "max_lines": Option(int, 2, "Lines a cue may have.", check=_positive),
        "max_cue_seconds": _seconds(7.0, "Longest time a cue stays on screen."),
        "pause_seconds": _seconds(0.5, "A silence this long between words always ends a cue, as a sentence end does."),
    },
    "local": {
        "model": Option(str, "bundled:tiny.en", "Model for local CPU transcription (the fallback)."),
        "device": Option(str, "cpu", "Device for local transcription: cpu, cuda or auto.", choices=("cpu", "cuda", "auto")),
        "compute_type": Option(str, "int8", "CTranslate2 compute type (int8, int8_float32, float32, float16...)."),
        "threads": Option(int, 0, "CPU threads for the local engine; 0 uses all cores.", check=_not_negative),
        "batch_size": Option(int, 8, "Speech chunks (up to 30 s each) decoded together; 8 measured fastest on CPU "
                             "(bench/README.md). 1 decodes sequentially.", check=_positive),
    },
    "remote": {
        "hosts": ListOf(
            HOST, [], "GPU hosts reached over SSH (SFTP only). Empty: everything runs locally.",
            required=("name", "host"), noun="host",
            example={"name": "gpu1", "host": "gpu1.example.org", "user": "whisperdrop",
                     "key": "~/.ssh/whisperdrop_ed25519", "known_hosts": "~/.ssh/known_hosts"},
        ),
        "connect_timeout": _seconds(10.0, "Seconds to open an SSH connection before the host counts as down."),
        "keepalive_interval": _seconds(15.0, "Seconds between SSH keepalives; 3 missed ones drop the connection."),
        "job_timeout": _seconds(1800.0, "Seconds to wait for a submitted job's result before falling back (auto)."),
        "parallel_uploads": Option(int, 2, "Uploads in flight at once, over all hosts.", check=_positive),
        "local_below_seconds": _seconds(0.0, "Audio shorter than this is transcribed locally (0: off).", zero_ok=True),
        "retry_initial_seconds": _seconds(5.0, "First back-off after a host fails; doubles up to the maximum."),
        "retry_max_seconds": _seconds(300.0, "Longest back-off between probes of a failed host."),
        "hand_back": Option(
            bool, True, "Before a job falls back to the CPU, probe the hosts in back-off once; while a job runs on "
            "the CPU as a fallback, hand it to a host that comes back when that finishes it sooner (README, GPU hosts).",
        ),
        "probe_interval": _seconds(
            5.0, "Least seconds between two probes of a host that is down: every job about to fall back, and the "
            "look for a host's return while a job runs on the CPU, share one probe per host.",
        ),
        "hand_back_margin": Option(
            NUMBER, 1.5, "A fallback goes back to a returning host only when its remaining CPU time exceeds the "
            "host's estimate (upload, queue, transcription) times this, by 10 s at least; 0: whenever one is back.",
            check=_not_negative,
        ),
        "heartbeat_max_age": _seconds(60.0, "A runner heartbeat older than this counts as no runner."),
        "poll_interval": _seconds(0.5, "First interval between result polls; backs off to 5 s."),
    },
    "runner": {
        "spool": Option(str, "spool", "Spool directory on the GPU host (the same one the SFTP account sees)."),
        "model": Option(str, "large-v3", "Model loaded at start and kept loaded."),
        "device": Option(str, "auto", "cuda, cpu or auto.", choices=("cuda", "cpu", "auto")),
        "device_index": Option(int, 0, "Which GPU.", check=_not_negative),
        "compute_type": Option(str, "default", "CTranslate2 compute type; default: float16 on CUDA, int8 on CPU."),
        "batch_size": Option(int, 16, "Speech chunks (up to 30 s each) decoded together; 16 for a GPU (bench/README.md), "
                             "halved on out-of-memory. 1 decodes sequentially.", check=_positive),
        "max_jobs_per_batch": Option(int, 16, "Queued jobs with the same model and options that one step claims and "
                                     "decodes in shared batches; 1 takes one job at a time.", check=_positive),
        "name": Option(str, None, "Runner name in heartbeats; default: hostname-gpuN.", nullable=True),
        "heartbeat_seconds": _seconds(5.0, "Interval between heartbeats."),
        "expire_days": Option(NUMBER, 7.0, "Leftover spool files older than this are removed.", check=_positive),
        "max_models": Option(int, 2, "Loaded models kept in memory at once.", check=_positive),
        "backend": Option(
            str, "local", "`local`: transcribe on this host's GPU; `slurm`: hand each job to `sbatch` on the "
            "cluster whose shared file system holds the spool (run the runner on its login node).",
            choices=("local", "slurm"),
        ),
        "slurm": {
            "partition": Option(str, None, "sbatch --partition; null: the cluster's default.", nullable=True),
            "account": Option(str, None, "sbatch --account; null: your default account.", nullable=True),
            "qos": Option(str, None, "sbatch --qos; null: the default.", nullable=True),
            "gres": Option(str, "gpu:1", "sbatch --gres for each task; null asks for no GPU.", nullable=True),
            "time_limit": Option(
                str, "1:00:00", "sbatch --time for each task ([days-]hours:minutes:seconds); a job killed by it "
                "fails with kind `slurm_timeout`.", nullable=True,
            ),
            "extra_args": Option(list, [], "Further sbatch arguments, one per item (e.g. --mem=16G).", check=_strings),
            "setup": Option(
                str, "", "Shell lines each batch script runs before the task (module load cuda, conda activate...).",
            ),
            "max_array": Option(int, 16, "Most jobs submitted in one sbatch (a job array).", check=_positive),
            "poll_seconds": _seconds(10.0, "Seconds between squeue polls and submissions."),
        },
    },
    "api": {
        "listen": Option(
            str, None, "HOST:PORT for the HTTP API (POST /transcribe, GET /health, /v1/audio/transcriptions, /asr); "
            "null: no API. Any address but loopback needs `api.token`.", check=_listen, nullable=True,
        ),
        "token": Option(str, None, "Bearer token every request must carry; null: none (loopback only).", nullable=True),
        "max_upload_mb": Option(NUMBER, 2048.0, "Largest upload accepted, in MB; larger ones get 413.", check=_positive),
        "write_outbox": Option(bool, True, "Also write each API job's outputs to the outbox (a request can say no)."),
        "sync_timeout": Option(
            NUMBER, 3600.0, "Seconds a synchronous request waits for its transcript before answering 504 with the "
            "job id (the job goes on; GET /jobs/<id> has it).", check=_positive,
        ),
    },
    "notify": {
        "webhook": Option(
            str, None, "URL that gets an HTTP POST of a small JSON (path, job id, route, outputs, error) when a job "
            "finishes or fails; null: none.", check=_http_url, nullable=True,
        ),
        "command": Option(
            list, None, "Command run (no shell) when a job finishes or fails, e.g. ['notify-send', 'whisperdrop']; "
            "the JSON arrives on its stdin and in WHISPERDROP_* variables. null: none.", check=_strings, nullable=True,
        ),
        "events": Option(list, ["done", "failed"], "Which outcomes notify: done, failed.", check=_events),
        "timeout_seconds": _seconds(10.0, "Each webhook call or command may take this long."),
        "retries": Option(int, 3, "Further tries after a failed call, with a doubling pause.", check=_not_negative),
    },
    "library_mode": Option(
        bool, False, "Media-library mode: write `<stem>.<lang>.srt` (and the other outputs) beside each source, the "
        "names Jellyfin, Plex and Bazarr look for; the source stays where it is and no file in the library is "
        "overwritten. The JSON Result still goes to the outbox.",
    ),
    "logging": {
        "level": Option(str, "info", "debug, info, warning or error.", choices=("debug", "info", "warning", "error")),
        "format": Option(str, "auto", "json, console, or auto (console on a terminal, JSON otherwise).", choices=("auto", "json", "console")),
        "file": Option(str, None, "Also append JSON lines to this file (reopened on SIGHUP).", nullable=True),
        "progress_seconds": Option(
            NUMBER, 30.0, "A transcription running longer than this logs `job.progress` this often; 0: every "
            "progress report (at most one a second).", check=_not_negative,
        ),
        "metrics_textfile": Option(str, None, "Prometheus textfile-collector file, rewritten atomically.", nullable=True),
    },
}

PATH_KEYS = ("inbox", "outbox", "archive", "failed", "state_dir")


class Config(dict):
    """The validated configuration: a dict tree with attribute access and resolved paths.

    `config.inbox` is a `Path`; `config["watch"]["settle_seconds"]` a number. `source` is the file
    it came from, or None for the embedded default.
    """

    source: Path | None = None
    default_inbox: bool = False  # `inbox` is the default `inbox` folder, which `run` creates
    sections: frozenset = frozenset()  # the top-level keys the file sets (see `role`)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def path(self, key: str) -> Path:
        return Path(self[key])


def defaults(schema: dict = SCHEMA) -> dict:
    """The default value of every option, as a plain dict tree."""
    tree: dict = {}
    for key, spec in schema.items():
        if isinstance(spec, dict):
            tree[key] = defaults(spec)
        elif isinstance(spec, ListOf):
            tree[key] = list(spec.default)
        else:
            tree[key] = list(spec.default) if isinstance(spec.default, list) else spec.default
    return tree


def _type_name(kind: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}
    if isinstance(kind, tuple):
        return "a number"
    return names.get(kind, kind.__name__)


def _check_leaf(path: str, spec: Option, value: Any, problems: list[str]) -> Any:
    if value is None:
        if spec.nullable or spec.default is None:
            return None
        problems.append(f"At '{path}': missing value; expected {_type_name(spec.kind)}")
        return spec.default
    kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
    # bool is an int in Python; a YAML `yes` for a number is a mistake, not a 1.
    wrong = isinstance(value, bool) and bool not in kinds
    if wrong or not isinstance(value, kinds):
        problems.append(f"At '{path}': {value!r} is {type(value).__name__}; expected {_type_name(spec.kind)}")
        return spec.default
    if spec.choices and value not in spec.choices:
        expected = ", ".join(spec.choices)
        problems.append(f"At '{path}': {value!r} is not one of {expected}")
        return spec.default
    if spec.check:
        expected = spec.check(value)
        if expected:
            problems.append(f"At '{path}': {value!r}; expected {expected}")
            return spec.default
    return value


def _unknown(path: str, key: Any, known: list[str]) -> str:
    where = f"{path}.{key}" if path else str(key)
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys here: {', '.join(known)}"
    return f"At '{where}': unknown key{hint}"


def _check_section(path: str, schema: dict, data: Any, problems: list[str]) -> dict:
    if not isinstance(data, dict):
        problems.append(f"At '{path or '<top>'}': expected a mapping of keys, got {type(data).__name__}")
        data = {}
    result: dict = {}
    for key in data:
        if key not in schema:
            problems.append(_unknown(path, key, list(schema)))
    for key, spec in schema.items():
        where = f"{path}.{key}" if path else key
        value = data.get(key)
        if isinstance(spec, dict):
            result[key] = _check_section(where, spec, value if value is not None else {}, problems)
        elif isinstance(spec, ListOf):
            result[key] = _check_list(where, spec, value if value is not None else [], problems)
        else:
            result[key] = _check_leaf(where, spec, value if key in data else spec.default, problems)
    return result


def _check_list(path: str, spec: ListOf, data: Any, problems: list[str]) -> list:
    if not isinstance(data, list):
        problems.append(f"At '{path}': expected a list, got {type(data).__name__}")
        return []
    items = [_check_section(f"{path}[{index}]", spec.item, item, problems) for index, item in enumerate(data)]
    for index, item in enumerate(items):
        for required in spec.required:
            if item.get(required) in (None, "", []):
                problems.append(f"At '{path}[{index}].{required}': missing; every {spec.noun} needs a {required}")
    names = [item.get("name") for item in items]
    for name in {name for name in names if name and names.count(name) > 1}:
        problems.append(f"At '{path}': the {spec.noun} name {name!r} is used more than once; names must be unique")
    return items


def validate(data: Any, base: Path, source: str = "<embedded default>") -> Config:
    """Check `data` against SCHEMA, fill defaults, resolve paths against `base`.

    Returns a Config; raises ConfigError listing every problem.
    """
    problems: list[str] = []
    if data is None:
        data = {}
    tree = _check_section("", SCHEMA, data, problems)
    if problems:
        raise ConfigError(source, problems)
    default_inbox = tree["inbox"] == SCHEMA["inbox"].default
    for key in PATH_KEYS:
        tree[key] = (base / os.path.expanduser(tree[key])).resolve()
    for key in ("file", "metrics_textfile"):
        if tree["logging"][key]:
            tree["logging"][key] = str((base / os.path.expanduser(tree["logging"][key])).resolve())
    tree["runner"]["spool"] = str((base / os.path.expanduser(tree["runner"]["spool"])).resolve())
    for host in tree["remote"]["hosts"]:
        for key in ("key", "known_hosts"):
            if host[key]:
                host[key] = str((base / os.path.expanduser(host[key])).resolve())
    config = Config(_wrap(tree))
    config.source = None if source == "<embedded default>" else Path(source)
    config.default_inbox = default_inbox
    config.sections = frozenset(data)
    return config


def _wrap(tree: Any) -> Any:
    if isinstance(tree, dict):
        return Config({key: _wrap(value) for key, value in tree.items()})
    if isinstance(tree, list):
        return [_wrap(item) for item in tree]
    return tree


def find(explicit: str | os.PathLike | None = None) -> Path | None:
    """The config file to use: `explicit`, then $WHISPERDROP_CONFIG, then `search_path()`.

    Returns None when none exists (the embedded default applies). Raises ConfigError when an
    explicitly named file is missing.
    """
    named = explicit or os.environ.get(ENV_VAR)
    if named:
        path = Path(named).expanduser()
        how = "-c" if explicit else f"${ENV_VAR}"
        if path.is_dir():
            raise ConfigError(str(path), [f"the config file given by {how} is a folder; name the file "
                                          f"(for example {path / 'config.yaml'})"])
        if not path.is_file():
            raise ConfigError(str(path), [f"the config file given by {how} does not exist; check the path"])
        return path
    return next((path for path in search_path() if path.is_file()), None)


def load(explicit: str | os.PathLike | None = None) -> Config:
    """Find, parse and validate the configuration. Raises ConfigError with every problem."""
    path = find(explicit)
    if path is None:
        return validate({}, Path.cwd())
    try:
        with open(path, encoding="utf-8") as stream:  # a stream, so that YAML errors name the file
            data = yaml.safe_load(stream)
    except yaml.YAMLError as error:
        raise ConfigError(str(path), [f"not valid YAML: {error}"]) from error
    except UnicodeDecodeError as error:
        raise ConfigError(str(path), [f"not a text file (byte {error.start} is not UTF-8)"]) from error
    except OSError as error:
        raise ConfigError(str(path), [f"cannot be read: {error.strerror}"]) from error
    return validate(data, path.resolve().parent, str(path))


RUNNER_SECTIONS = frozenset({"runner", "logging"})


def role(config: Config) -> str:
    """"runner" when the file configures only the GPU runner (a `runner` section, and nothing but
    `logging` beside it, like the README's runner.yaml), else "daemon"."""
    sections = set(config.sections)
    return "runner" if "runner" in sections and sections <= RUNNER_SECTIONS else "daemon"


def _folder_problem(key: str, path: Path, made_by: str) -> str | None:
    """What stops `made_by` from using folder `path` (config key `key`), without creating anything:
    an existing path must be a folder this user can write; a missing one must be creatable (its
    nearest existing parent a folder this user can write). None when usable."""
    shown = repr(str(path))
    if path.exists():
        if not path.is_dir():
            return f"At '{key}': {shown} is not a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"At '{key}': {shown} is not writable by this user; fix its owner or permissions"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"At '{key}': {made_by} cannot create {shown}: {str(parent)!r} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return (f"At '{key}': {made_by} cannot create {shown}: {str(parent)!r} is not writable by this user; "
                "create the folder and give it to the user that runs whisperdrop")
    return None


def _file_problem(key: str, path: Path) -> str | None:
    """A file the config names that is missing, not a file, or unreadable; None when it can be read."""
    shown = repr(str(path))
    if not path.exists():
        return f"At '{key}': {shown} does not exist"
    if not path.is_file():
        return f"At '{key}': {shown} is not a file"
    if not os.access(path, os.R_OK):
        return f"At '{key}': {shown} cannot be read by this user; fix its owner or permissions"
    return None


_PUBLIC_KEY_STARTS = (b"ssh-", b"ecdsa-sha2-", b"sk-ssh-", b"sk-ecdsa-", b"---- BEGIN SSH2 PUBLIC KEY")


def is_public_key(path: Path) -> bool:
    """True when `path` holds an SSH public key (OpenSSH one-line or RFC 4716), not a private key.
    An unreadable file counts as not one."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(64).lstrip()
    except OSError:
        return False
    return head.startswith(_PUBLIC_KEY_STARTS)


def private_key_hint(public: Path) -> str:
    """What to give as `key` instead of the public key `public`: the file beside it without .pub, when there is one."""
    private = public.with_suffix("") if public.suffix == ".pub" else None
    return (f"the private key is probably {private}" if private is not None and private.is_file()
            else "give the private key file (the one without .pub)")


def _host_problems(index: int, host: dict) -> list[str]:
    """A host's key file and known_hosts file: missing, unreadable, or a public key given as `key`."""
    problems = []
    where = f"remote.hosts[{index}]"
    if host.get("key"):
        key = Path(host["key"])
        problem = _file_problem(f"{where}.key", key)
        if problem:
            problems.append(problem + "; point it at the host's private key, or remove it to use ssh-agent "
                                      "and the usual ~/.ssh/id_* keys")
        elif is_public_key(key):
            problems.append(f"At '{where}.key': {str(key)!r} is a public key; 'key' takes the private key: "
                            f"{private_key_hint(key)}")
    if host.get("known_hosts"):
        known_hosts = Path(host["known_hosts"])
        problem = _file_problem(f"{where}.known_hosts", known_hosts)
        if problem:
            port = f"-p {host['port']} " if host.get("port", 22) != 22 else ""
            problems.append(problem + f"; after checking the host key's fingerprint: ssh-keyscan {port}"
                                      f"{shlex.quote(str(host['host']))} >> {shlex.quote(str(known_hosts))}")
    return problems


def check(config: Config, role_name: str | None = None) -> list[str]:
    """Every problem that stops `whisperdrop run` (role "daemon") or `whisperdrop runner` (role
    "runner") from starting with `config`, each with its key path; [] when it can start. The role
    defaults to `role(config)`. Reads only: nothing is created, so `check-config` and `run` share it
    (`run` makes the folders afterwards with `make_folders`)."""
    role_name = role_name or role(config)
    problems: list[str] = []
    if config.logging.file:
        problems.append(_folder_problem("logging.file", Path(config.logging.file).parent, "logging"))
    if role_name == "runner":
        problems.append(_folder_problem("runner.spool", Path(config.runner.spool), "the runner"))
        if config.runner.name is not None:
            from whisperdrop.spool import ProtocolError, check_runner_name

            try:
                check_runner_name(config.runner.name)
            except ProtocolError as error:
                problems.append(f"At 'runner.name': {error}")
        return [problem for problem in problems if problem]
    source = str(config.source) if config.source else "the config file"
    if role(config) == "runner":
        problems.append(f"At '<top>': {source} configures only the GPU runner (sections: "
                        f"{', '.join(sorted(config.sections))}); start that with `whisperdrop runner -c {source}`, "
                        "or add the daemon's keys (inbox, outbox, transcription...) to run the daemon with it")
    if config.inbox.is_dir():
        if not os.access(config.inbox, os.R_OK | os.W_OK | os.X_OK):
            problems.append(f"At 'inbox': {str(config.inbox)!r} is not readable and writable by this user "
                            "(sources are moved out of it); fix its owner or permissions")
    elif config.inbox.exists():
        problems.append(f"At 'inbox': {str(config.inbox)!r} is not a folder")
    elif config.default_inbox:  # the default `inbox` beside the config (or in the working directory) is made
        problems.append(_folder_problem("inbox", config.inbox, "the daemon"))
    else:  # an inbox you named must exist: a typo or an unmounted disk must not get a fresh empty folder
        problems.append(
            f"At 'inbox': {str(config.inbox)!r} does not exist; create it (mkdir -p) or point 'inbox' at your folder")
    for key in ("outbox", "archive", "failed", "state_dir"):
        problems.append(_folder_problem(key, config.path(key), "the daemon"))
    if config.transcription.provider == "remote" and not config.remote.hosts:
        problems.append("At 'transcription.provider': 'remote' needs at least one entry in 'remote.hosts'; "
                        "add a GPU host or use provider 'auto' or 'local'")
    for index, host in enumerate(config.remote.hosts):
        problems += _host_problems(index, host)
    from whisperdrop.profiles import check as profile_problems  # globs that never match, translate with *.en

    problems += profile_problems(config)
    problems.append(_api_problem(config))
    return [problem for problem in problems if problem]


def _api_problem(config: Config) -> str | None:
    """The API must not listen beyond this machine without a token."""
    listen = config.api.listen
    if not listen or config.api.token:
        return None
    import ipaddress

    host = listen.rpartition(":")[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (f"At 'api.listen': {listen!r} is not a loopback address and 'api.token' is null: anyone who can reach "
            "it could use this machine and its GPU hosts; set api.token (e.g. the output of `openssl rand -hex 32`) "
            "or listen on 127.0.0.1")


def make_folders(config: Config) -> list[str]:
    """Create the daemon's folders that do not exist yet (the default inbox; outbox, archive, failed,
    state_dir), after `check` found no problem. Returns a problem per folder that could not be made."""
    keys = (["inbox"] if config.default_inbox else []) + ["outbox", "archive", "failed", "state_dir"]
    problems = []
    for key in keys:
        path = config.path(key)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            problems.append(f"At '{key}': cannot create {str(path)!r}: {error.strerror}")
    return problems


def insecure_files(config: Config) -> list[str]:
    """Warnings for files that others could change or read: the config file and each host's
    known_hosts group- or world-writable, a private key readable or writable by group or others.

    Returns one message per file, naming it and the command that fixes it; missing files are skipped
    (`check` reports them)."""
    checked: list[tuple[str, Path, bool]] = []  # (what, path, private)
    if config.source is not None:
        checked.append(("the config file", Path(config.source), False))
    for index, host in enumerate(config.remote.hosts):
        if host.get("key"):  # a public key given by mistake is `check`'s to report, not a private key exposed
            checked.append((f"remote.hosts[{index}].key", Path(host["key"]), not is_public_key(Path(host["key"]))))
        if host.get("known_hosts"):
            checked.append((f"remote.hosts[{index}].known_hosts", Path(host["known_hosts"]), False))
    warnings = []
    for what, path, private in checked:
        try:
            mode = path.stat().st_mode
        except OSError:
            continue
        quoted = shlex.quote(str(path))
        if private and mode & 0o077:
            warnings.append(f"{what}: {str(path)!r} is a private key that group or others can access "
                            f"(mode {mode & 0o777:03o}); fix: chmod 600 {quoted}")
        elif not private and mode & 0o022:
            warnings.append(f"{what}: {str(path)!r} can be written by group or others "
                            f"(mode {mode & 0o777:03o}); fix: chmod go-w {quoted}")
    return warnings


def render_default_yaml() -> str:
    """The documented default config.yaml, generated from SCHEMA (descriptions become comments)."""
    lines = [
        "# whisperdrop configuration. Every option, its default and what it does.",
        "# Relative paths resolve against this file's folder. Check it with: whisperdrop check-config",
        "",
    ]

    def emit(schema: dict, indent: int) -> None:
        pad = "  " * indent
        for key, spec in schema.items():
            if isinstance(spec, dict):
                lines.append(f"{pad}{key}:")
                emit(spec, indent + 1)
                if indent == 0:
                    lines.append("")
                continue
            lines.append(f"{pad}# {spec.description}")
            if isinstance(spec, ListOf):
                lines.append(f"{pad}{key}: []")
                lines.append(f"{pad}# - name: {spec.example['name']}")
                for name, field_spec in spec.item.items():
                    example = spec.example.get(name, field_spec.default)
                    if name != "name":
                        lines.append(f"{pad}#   {name}: {_yaml_scalar(example)}   # {field_spec.description}")
                continue
            lines.append(f"{pad}{key}: {_yaml_scalar(spec.default)}")
            if indent == 0:
                lines.append("")

    emit(SCHEMA, 0)
    return "\n".join(lines).rstrip() + "\n"


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def render_markdown_reference() -> str:
    """The configuration reference table for the README, generated from SCHEMA (a test keeps them equal)."""
    rows = ["| key | default | what it does |", "|---|---|---|"]

    def emit(schema: dict, prefix: str) -> None:
        for key, spec in schema.items():
            path = f"{prefix}{key}"
            if isinstance(spec, dict):
                emit(spec, f"{path}.")
            elif isinstance(spec, ListOf):
                rows.append(f"| `{path}` | `[]` | {spec.description} |")
                emit(spec.item, f"{path}[].")
            else:
                choices = f" One of: {', '.join(f'`{choice}`' for choice in spec.choices)}." if spec.choices else ""
                default = "(required)" if spec.default is None and not spec.nullable else f"`{_yaml_scalar(spec.default)}`"
                rows.append(f"| `{path}` | {default} | {spec.description.replace('|', '/')}{choices} |")

    emit(SCHEMA, "")
    return "\n".join(rows) + "\n"
