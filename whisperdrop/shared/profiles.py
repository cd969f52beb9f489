"""Per-folder profiles and per-job options: what one job is transcribed with, and which outputs it gets.

A profile (config `profiles`) matches inbox-relative paths with globs (`bjj/**`) and overrides the
`transcription` options for the files it matches; the first profile that matches wins. An API request
or `whisperdrop transcribe --profile NAME` names one instead, and may override options of its own on
top (`overrides`, the TranscribeOptions field names plus `outputs`).

`plan(config, relpath=..., profile=..., overrides=...)` is the one function every entry point calls
(the daemon's intake, the HTTP API, the one-shot CLI): it returns a `Plan`, the effective
TranscribeOptions (what the job id is hashed over, so the same bytes with other options are another
job), the output formats and the profile's name (None when none applies). A profile that changes only
`outputs` leaves the options, and so the job, as they were: the transcript is made once and each
source gets the outputs of its own profile.

Globs: `*` and `?` stay within one folder level, `[abc]`/`[!abc]` are character classes, `**` as a whole
path segment spans any number of folders (also none); a pattern matches the whole relative path, so
`*.mp3` matches only files at the top of the inbox and `**/*.mp3` those at any depth. Case-sensitive.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from typing import Any, Callable

from whisperdrop.shared.errors import WhisperdropError
from whisperdrop.shared.model_names import MULTILINGUAL_MODELS, english_only
from whisperdrop.shared.spool import TASKS, TranscribeOptions, temperature_problem

# The keys a profile (or a request) may override: every TranscribeOptions field, and the outputs.
OPTION_KEYS = tuple(field.name for field in dataclasses.fields(TranscribeOptions))
OVERRIDE_KEYS = OPTION_KEYS + ("outputs",)
OUTPUT_FORMATS = ("srt", "vtt", "txt")  # what the outbox renders beside the JSON (daemon.outbox.FORMATS)
AUTO_LANGUAGE = "auto"  # `language: auto` detects the language (as null does where nothing is inherited)


class ProfileError(WhisperdropError):
    """A profile or option that cannot be used: an unknown profile name, an unknown or invalid option.
    The message names the thing and the fix."""

    kind = "profile"


@dataclass(frozen=True)
class Plan:
    """What one job is made with: the effective options (hashed into its job id), the formats written
    beside `<stem>.json`, and the name of the profile that applied (None when none did)."""

    options: TranscribeOptions
    formats: tuple[str, ...]
    profile: str | None = None


# globs


@functools.lru_cache(maxsize=256)
def compile_glob(pattern: str) -> re.Pattern:
    """The regular expression for a glob over '/'-separated relative paths (see the module's doc)."""
    segments = pattern.split("/")
    parts = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            parts.append(".*" if last else "(?:[^/]+/)*")
        else:
            parts.append(_segment_regex(segment) + ("" if last else "/"))
    return re.compile("".join(parts), re.DOTALL)


def _segment_regex(segment: str) -> str:
    out, index = [], 0
    while index < len(segment):
        character = segment[index]
        if character == "*":
            while index + 1 < len(segment) and segment[index + 1] == "*":  # `a**b` inside a segment: one `*`
                index += 1
            out.append("[^/]*")
        elif character == "?":
            out.append("[^/]")
        elif character == "[":
            end = segment.find("]", index + 2 if segment[index + 1:index + 2] in ("!", "^") else index + 1)
            if end == -1:  # no closing bracket: a literal '['
                out.append(re.escape(character))
            else:
                body = segment[index + 1:end]
                negate = body[:1] in ("!", "^")
                body = body[1:] if negate else body
                body = body.replace("\\", "\\\\").replace("[", "\\[")
                out.append(f"[{'^/' if negate else ''}{body}]")
                index = end
        else:
            out.append(re.escape(character))
        index += 1
    return "".join(out)


def glob_matches(pattern: str, relpath: str) -> bool:
    """Whether the inbox-relative, '/'-separated `relpath` matches `pattern` as a whole."""
    return compile_glob(pattern).fullmatch(relpath) is not None


def glob_problem(pattern: str) -> str | None:
    """Why `pattern` can never match an inbox-relative path (absolute, `..`, empty folder names, a
    backslash), or None when it can."""
    if pattern.startswith("/"):
        return "an absolute path never matches: patterns are relative to the inbox, e.g. 'bjj/**'"
    if "\\" in pattern:
        return "use '/' between folders (paths are matched '/'-separated), e.g. 'bjj/**'"
    segments = pattern.split("/")
    if any(segment in (".", "..") for segment in segments):
        return "'.' and '..' never appear in an inbox-relative path; write the path from the inbox down"
    if any(segment == "" for segment in segments):
        return "an empty folder name ('//' or a trailing '/') never matches; for a folder's files write 'folder/**'"
    return None


# profiles


def profiles(config: Any) -> list[dict]:
    return list(config.get("profiles") or [])


def find(config: Any, name: str) -> dict:
    """The profile called `name`. Raises ProfileError naming the known profiles."""
    for profile in profiles(config):
        if profile.get("name") == name:
            return profile
    known = ", ".join(repr(profile["name"]) for profile in profiles(config)) or "none (the config has no `profiles`)"
    raise ProfileError(f"unknown profile {name!r}; the profiles in the config are: {known}",
                       hint="name one of them, or add it to `profiles` in config.yaml")


def match(config: Any, relpath: str) -> dict | None:
    """The first profile whose `match` globs fit the inbox-relative `relpath`, or None."""
    for profile in profiles(config):
        if any(glob_matches(pattern, relpath) for pattern in profile.get("match") or []):
            return profile
    return None


def base_options(config: Any) -> TranscribeOptions:
    """The `transcription` section's options (`language: auto` read as null: detect)."""
    options = TranscribeOptions.from_config(config.transcription)
    if options.language == AUTO_LANGUAGE:
        options = dataclasses.replace(options, language=None)
    return options


def apply(options: TranscribeOptions, overrides: dict | None, where: str = "options") -> TranscribeOptions:
    """`options` with every non-null option in `overrides` over it (`language: auto` detects; `outputs`
    is not an option and is ignored here). Raises ProfileError for an unknown key or a wrong value,
    naming `where` the overrides came from."""
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise ProfileError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(OVERRIDE_KEYS)}")
    changes = {key: value for key, value in overrides.items() if key in OPTION_KEYS and value is not None}
    if changes.get("language") == AUTO_LANGUAGE:
        changes["language"] = None
    if "task" in changes and changes["task"] not in TASKS:
        raise ProfileError(f"{where}: task {changes['task']!r} is not one of {', '.join(TASKS)}")
    if "beam_size" in changes and (not isinstance(changes["beam_size"], int) or changes["beam_size"] < 1):
        raise ProfileError(f"{where}: beam_size must be a positive integer, not {changes['beam_size']!r}")
    if temperature_problem(changes.get("temperature")):
        raise ProfileError(f"{where}: {temperature_problem(changes.get('temperature'))}")
    return dataclasses.replace(options, **changes)


def formats_of(config: Any, profile: dict | None, overrides: dict | None = None) -> tuple[str, ...]:
    """The formats written beside `<stem>.json`: the request's `outputs`, else the profile's, else
    `transcription.outputs`. Raises ProfileError for a format the outbox does not write."""
    for chosen in ((overrides or {}).get("outputs"), (profile or {}).get("outputs"), config.transcription.outputs):
        if chosen is not None:
            chosen = [fmt for fmt in chosen if fmt != "json"]  # `<stem>.json` is always written
            bad = [fmt for fmt in chosen if fmt not in OUTPUT_FORMATS]
            if bad:
                raise ProfileError(f"unknown output format(s) {', '.join(map(str, bad))}; "
                                   f"the outbox writes json and {', '.join(OUTPUT_FORMATS)}")
            return tuple(dict.fromkeys(chosen))
    return ()


def plan(config: Any, *, relpath: str | None = None, profile: str | None = None, overrides: dict | None = None,
         planned: Callable[[TranscribeOptions], TranscribeOptions] = lambda options: options) -> Plan:
    """The Plan of one job: `transcription`, then the profile named `profile` (else the first whose
    globs match `relpath`, else none), then `overrides` (a request's own options). `planned` is the
    router's `planned_options` (the local model where every job runs here). Raises ProfileError for
    an unknown profile name, a bad override, or what an English-only model cannot do (translate, a
    language other than English: `capability_problem`)."""
    chosen = find(config, profile) if profile is not None else (match(config, relpath) if relpath is not None else None)
    options = base_options(config)
    if chosen is not None:
        options = apply(options, {key: chosen.get(key) for key in OVERRIDE_KEYS}, f"profile {chosen['name']!r}")
    options = planned(apply(options, overrides, "options"))
    problem = capability_problem(options)
    if problem:  # the engine would refuse it at job time; a request hears it now
        raise ProfileError(problem, hint="name a multilingual model, or drop the language or task it cannot do")
    return Plan(options=options, formats=formats_of(config, chosen, overrides),
                profile=chosen["name"] if chosen is not None else None)


# translation and languages other than English need a multilingual model


def capability_problem(options: TranscribeOptions, english_only_model: bool | None = None) -> str | None:
    """Why `options` cannot be done by its model, with the fix: translate, or a `language` other than
    English, with an English-only model (judged from the model's name unless `english_only_model`
    says); else None. Such a model would transcribe instead of translating, and write
    English-sounding nonsense labelled `en` for German."""
    if not (english_only(options.model) if english_only_model is None else english_only_model):
        return None
    if options.task == "translate":
        return (f"model {options.model} is English-only and cannot translate; use a multilingual model "
                f"({MULTILINGUAL_MODELS}) to translate")
    if options.language not in (None, "en"):
        return (f"model {options.model} is English-only and cannot transcribe language {options.language!r}; use a "
                f"multilingual model ({MULTILINGUAL_MODELS}), or leave language empty (or en) for English speech")
    return None


def check(config: Any) -> list[str]:
    """Problems of the `profiles` section and of what a model cannot do that the schema cannot see,
    each with its key path: a glob that can never match, and translate or a language other than
    English where the model that would do it is English-only (the configured model, a profile's, or
    `local.model` where every job runs here)."""
    problems = []
    local_only = config.transcription.provider == "local" or not config.remote.hosts
    base = base_options(config)

    def capability_check(where: str, options: TranscribeOptions) -> None:
        model = config.local.model if local_only else options.model
        problem = capability_problem(dataclasses.replace(options, model=model))
        if problem:
            fix = ("local.model: every job runs on this machine" if local_only
                   else f"{where}.model" if where.startswith("profiles") else "transcription.model")
            asked = "task translate" if options.task == "translate" else f"language {options.language!r}"
            problems.append(f"At '{where}': {asked} with {model}, which is English-only; set a multilingual model "
                            f"({MULTILINGUAL_MODELS}) in {fix}" + (
                                f", or remove {where}.language" if options.task != "translate" else ""))

    capability_check("transcription", base)
    for index, profile in enumerate(profiles(config)):
        for number, pattern in enumerate(profile.get("match") or []):
            problem = glob_problem(pattern)
            if problem:
                problems.append(f"At 'profiles[{index}].match[{number}]': {pattern!r}: {problem}")
        try:
            options = apply(base, {key: profile.get(key) for key in OVERRIDE_KEYS}, f"profiles[{index}]")
        except ProfileError as error:
            problems.append(f"At 'profiles[{index}]': {error}")
            continue
        capability_check(f"profiles[{index}]", options)
    return problems
