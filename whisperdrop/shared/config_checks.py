"""What stops `whisperdrop run` or `whisperdrop runner` from starting with a valid config, found
without creating anything: folders that cannot be used or made, key and known_hosts files (missing,
unreadable, a public key given as the private one), profiles that can never apply, a bundled model
whose install extra is missing, an API open to the network without a token; and which of the two a config file is for (`role`).

`check` is shared by `check-config` and `run`, so they never disagree; `make_folders` then creates
the daemon's folders; `insecure_files` warns of files that others could change or read.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from whisperdrop.shared.config import Config

RUNNER_SECTIONS = frozenset({"runner", "logging"})


def role(config: Config) -> str:
    """"runner" when the file configures only the GPU runner (a `runner` section, and nothing but
    `logging` beside it, like docs/gpu-host.md's runner.yaml), else "daemon"."""
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
        problems.append(_bundled_problem("runner.model", config.runner.model))
        if config.runner.name is not None:
            from whisperdrop.shared.spool import ProtocolError, check_runner_name

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
    if config.transcription.provider != "remote" or not config.remote.hosts:  # a GPU host's model is that host's
        problems.append(_bundled_problem("local.model", config.local.model))
    if config.transcription.provider == "remote" and not config.remote.hosts:
        problems.append("At 'transcription.provider': 'remote' needs at least one entry in 'remote.hosts'; "
                        "add a GPU host or use provider 'auto' or 'local'")
    for index, host in enumerate(config.remote.hosts):
        problems += _host_problems(index, host)
    from whisperdrop.shared.profiles import check as profile_problems  # globs that never match, translate with *.en

    problems += profile_problems(config)
    problems.append(_api_problem(config))
    return [problem for problem in problems if problem]


def _bundled_problem(key: str, model: str | None) -> str | None:
    """A bundled model (`bundled:base`) whose packages are not installed here, naming the install extra."""
    from whisperdrop.shared.model_names import bundled_missing

    missing = bundled_missing(model)
    return f"At '{key}': {missing}" if missing else None


def _api_problem(config: Config) -> str | None:
    """The API must not listen beyond this machine without a token, unless `api.trusted_networks`
    names who may call without one; and the uploads in flight must hold at least one largest upload."""
    api = config.api
    if api.listen and api.max_uploads_in_flight_mb < api.max_upload_mb:
        return (f"At 'api.max_uploads_in_flight_mb': {api.max_uploads_in_flight_mb:g} is below api.max_upload_mb "
                f"({api.max_upload_mb:g}): the largest upload would always get 503; raise it, or lower max_upload_mb")
    listen = api.listen
    if not listen or api.token or api.trusted_networks:
        return None
    if _loopback_listen(listen):
        return None
    return (f"At 'api.listen': {listen!r} is not a loopback address and 'api.token' is null: anyone who can reach "
            "it could use this machine and its GPU hosts; set api.token (e.g. the output of `openssl rand -hex 32`), "
            "list the networks allowed without a token in api.trusted_networks, or listen on 127.0.0.1")


def _loopback_listen(listen: str) -> bool:
    import ipaddress

    host = listen.rpartition(":")[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_warnings(config: Config) -> list[str]:
    """Warnings about who the API serves without a token (`api.trusted_networks`); [] when it has no
    listen address or no trusted networks."""
    api = config.api
    if not api.listen or not api.trusted_networks:
        return []
    networks = ", ".join(api.trusted_networks)
    others = "every other address needs api.token" if api.token else (
        "every other address is refused (loopback excepted), as api.token is null")
    return [f"api.trusted_networks: requests from {networks} are served WITHOUT a token (unauthenticated: anyone "
            f"on those networks can use this machine and its GPU hosts); {others}"]


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
