"""Configuration: find the config file, check it against the schema, and hand out a `Config`.

`load(path)` finds the file, checks it against `config_schema.SCHEMA` and returns a `Config`. Every
problem is collected with its key path (`At 'watch.settle_seconds': ...`; an unknown key gets the
closest known one as "did you mean") and raised at once as `ConfigError`, before anything runs.
`defaults()` is every option's default. What stops `run` or `runner` from starting with a valid
config (folders, key files, profiles) is found in `config_checks`; the schema itself, and the
config.yaml and reference table made from it, are in `config_schema`.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from whisperdrop.shared.config_schema import SCHEMA, ListOf, Option

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
        return "a number" if set(kind) == {int, float} else " or ".join(_type_name(one) for one in kind)
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
    return spec.convert(value) if spec.convert else value


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
            where = f"At '{path}[{index}].{required}'"
            reported = any(problem.startswith(where) for problem in problems)  # a wrong value: one message
            if item.get(required) in (None, "", []) and not reported:
                problems.append(f"{where}: missing; every {spec.noun} needs a {required}")
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


def yaml_problem(path: Path, error: yaml.YAMLError) -> str:
    """PyYAML's complaint as one problem line: the file, the line and column where it went wrong,
    what was wrong there and (when PyYAML says) what it was parsing and where that began. PyYAML's
    own text spreads this over four lines, which broke out of the problem list."""
    mark = getattr(error, "problem_mark", None)
    problem = " ".join(str(getattr(error, "problem", None) or "").split())
    if mark is None or not problem:
        return f"not valid YAML: {' '.join(str(error).split())}"
    said = f"{path}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {problem}"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context:
        where = ""
        if context_mark is not None and (context_mark.line, context_mark.column) != (mark.line, mark.column):
            where = f" that began at line {context_mark.line + 1}, column {context_mark.column + 1}"
        said += f" ({' '.join(str(context).split())}{where})"
    return said


def load(explicit: str | os.PathLike | None = None) -> Config:
    """Find, parse and validate the configuration. Raises ConfigError with every problem."""
    path = find(explicit)
    if path is None:
        return validate({}, Path.cwd())
    try:
        with open(path, encoding="utf-8") as stream:  # a stream, so that YAML errors name the file
            data = yaml.safe_load(stream)
    except yaml.YAMLError as error:
        raise ConfigError(str(path), [yaml_problem(path, error)]) from error
    except UnicodeDecodeError as error:
        raise ConfigError(str(path), [f"not a text file (byte {error.start} is not UTF-8)"]) from error
    except OSError as error:
        raise ConfigError(str(path), [f"cannot be read: {error.strerror}"]) from error
    return validate(data, path.resolve().parent, str(path))
