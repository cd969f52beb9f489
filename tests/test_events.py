"""Issue 13, item 8: one log schema. Every event the package logs is in whisperdrop/shared/events.py with
its fields, the event table of docs/logs.md is made from that list, and that page's recipe for the whole
story of one job finds every line of that job in a real daemon's log."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path


from daemon_helpers import Daemon
from sshd import skip_or_fail
from media import JFK
from whisperdrop.shared import events

REPO = Path(__file__).resolve().parents[1]
LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
NAME = re.compile(r"^[a-z][a-z_]*\.[a-z_.]+$")


def log_calls():
    """(file, line, event, keywords) of every `<logger>.<level>("<event>", ...)` call in the package,
    `functools.partial(<logger>.<level>, "<event>", ...)` and `(<logger>.<a> if ... else <logger>.<b>)(...)`
    included."""
    for path in sorted((REPO / "whisperdrop").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func, args = node.func, node.args
            if getattr(func, "attr", getattr(func, "id", None)) == "partial" and args \
                    and isinstance(args[0], ast.Attribute) and args[0].attr in LEVELS:
                func, args = args[0], args[1:]
            if isinstance(func, ast.IfExp) and all(isinstance(branch, ast.Attribute) and branch.attr in LEVELS
                                                   for branch in (func.body, func.orelse)):
                func = func.body  # (log.warning if ... else log.info)("event", ...)
            if not (isinstance(func, ast.Attribute) and func.attr in LEVELS and args):
                continue
            if isinstance(args[0], ast.Constant) and isinstance(args[0].value, str) and node.keywords:
                yield path.relative_to(REPO), node.lineno, args[0].value, [k.arg for k in node.keywords if k.arg]


def test_every_logged_event_and_field_is_in_the_schema():
    """Each event the package logs is namespaced, listed in events.EVENTS, and uses only its fields."""
    problems = []
    for path, line, name, keywords in log_calls():
        event = events.EVENTS.get(name)
        if event is None or not NAME.match(name):
            problems.append(f"{path}:{line}: {name!r} is not a namespaced event of whisperdrop/shared/events.py")
            continue
        unknown = [key for key in keywords if key not in event.fields and key not in events.ALWAYS]
        if unknown:
            problems.append(f"{path}:{line}: {name} logs {unknown}, not among its fields {event.fields}")
    assert not problems, "\n".join(problems)


def test_every_daemon_event_in_the_schema_is_logged():
    """The schema lists no daemon event that the code no longer logs."""
    logged = {name for _, _, name, _ in log_calls()}
    stale = [name for name, event in events.EVENTS.items() if event.log == "daemon" and name not in logged]
    assert not stale


def test_job_events_carry_job_id_and_path():
    """job.retry, job.failed, job.done, job.progress and stage.transcribe name the job and its file."""
    for name in ("job.retry", "job.failed", "job.done", "job.progress", "stage.transcribe", "stage.extract",
                 "stage.outbox"):
        assert {"job_id", "path"} <= set(events.EVENTS[name].fields), name


def test_readme_event_table_is_the_schema():
    """The event table of docs/logs.md is events.markdown(), word for word."""
    page = (REPO / "docs" / "logs.md").read_text()
    assert events.markdown() in page


def whole_story_recipe() -> str:
    page = (REPO / "docs" / "logs.md").read_text().splitlines()
    index = next(i for i, line in enumerate(page) if "whole story of one job" in line.lower() and line.startswith("#"))
    return page[index + 1]


def test_readme_whole_story_recipe_finds_every_line_of_a_job(tmp_path):
    """The jq recipe of docs/logs.md for one job, given the 12-digit id `status` shows, prints every log line
    of a real daemon that carries that job's id, and no other."""
    if shutil.which("jq") is None:
        skip_or_fail("jq is not installed (apt-get install jq; bash scripts/test installs it as root)")
    daemon = Daemon(tmp_path).start()
    try:
        target = daemon.inbox / "story.flac"
        shutil.copyfile(JFK, tmp_path / "story.part")
        (tmp_path / "story.part").rename(target)
        # job.done, not the archived file: a stop between the archiving and that commit parks the job
        # (its delivery is redone at the next start), and the story would end early
        daemon.wait_for(lambda: daemon.count("job.done") >= 1, timeout=120, what="job.done for story.flac")
    finally:
        assert daemon.stop(timeout=60) == 0
    job_id = json.loads((daemon.outbox / "story.json").read_text())["job_id"]
    recipe = whole_story_recipe()
    pipeline = recipe.split("|", 1)[1].strip().replace("JOB_ID", job_id[:12])
    assert pipeline.startswith("jq ")
    found = subprocess.run(["bash", "-c", pipeline], input=daemon.log_path.read_bytes(), capture_output=True,
                           check=True).stdout.decode().splitlines()
    expected = [line for line in daemon.log_path.read_text().splitlines() if job_id in line]
    assert len(found) == len(expected) >= 5
    assert all(job_id in line for line in found)
