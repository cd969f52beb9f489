"""The page at `/` (daemon/api/routes_page.py, overview.py, page/): what its JSON says, unit by unit,
and the page itself in Debian's headless chromium against a real daemon (a real sshd and runner for
the GPU host, the bundled tiny.en model). Each browser state is saved as a screenshot under the
test's tmp folder; `scripts/screenshot-page` copies one into docs/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx

from browser import chromium, console_errors, wait_for
from daemon_helpers import Daemon, write_speech_wav, write_variant_wav
from media import JFK
from sshd import SSHServer
from test_api import free_port
from test_remote import FAST_REMOTE, RunnerProcess
from whisperdrop.daemon.api import overview
from whisperdrop.daemon.ledger import JOB_STAGES, Job

SCREENSHOT_COPY = "WHISPERDROP_PAGE_SCREENSHOT"  # set by scripts/screenshot-page: where the docs' copy goes
NOW = 1_000_000.0


def job(stage: str, **fields) -> Job:
    base = dict(job_id="a" * 64, stage=stage, attempts=0, created_at=NOW - 60, updated_at=NOW - 1,
                source_sha256="b" * 64, source_size=1, options={"model": "bundled:tiny.en"})
    return Job(**{**base, **fields})


def no_scrub(text, name):
    return text


# ---------------------------------------------------------------- the JSON, unit by unit


def test_a_job_row_says_what_the_job_is_doing_in_words():
    """Each stage reads as what is under way (queued until a stage starts, uploading with its host,
    waiting for a GPU host or for a retry); running rows carry their progress, finished ones their
    real-time factor and, when failed, the hint; an upload is named by its file name."""
    row = lambda item, relpath="talk/a.flac", working=True, waiting=False: overview.job_row(  # noqa: E731
        item, relpath, working=working, waiting_for_host=waiting, now=NOW, scrub=no_scrub)
    assert row(job("new"), working=False)["status"] == "queued" and row(job("new"), working=False)["step"] == "queued"
    assert (row(job("new"))["status"], row(job("new"))["step"]) == ("running", "extracting the audio")
    assert row(job("extracted", host="gpu1", progress={"upload": 0.5}))["step"] == "uploading to gpu1"
    assert row(job("extracted"), waiting=True)["step"] == "waiting for a GPU host"
    assert row(job("extracted", progress={"transcribe": 0.2, "done_s": 2.0}), waiting=True)["step"] == "transcribing"
    assert row(job("submitted", host="gpu1"))["step"] == "transcribing on gpu1"
    assert row(job("extracted", retry_at=NOW + 30, last_error="OSError: disk"))["step"] == "waiting 30 s to try again"
    running = row(job("extracted", duration=20.0, progress={"transcribe": 0.25, "done_s": 5.0}))
    assert running["progress"] == {"upload": None, "transcribe": 0.25, "done_s": 5.0, "duration_s": 20.0}
    done = row(job("done", duration=20.0, route="local", timings={"transcribe_s": 5.0}, finished_at=NOW))
    assert done["status"] == "done" and done["real_time_factor"] == 0.25 and "progress" not in done
    failed = row(job("failed", last_error="audio: cannot decode", hint="check the file"))
    assert (failed["error"], failed["hint"]) == ("audio: cannot decode", "check the file")
    assert row(job("done"), relpath=".api/0f0f/interview.m4a")["name"] == "interview.m4a"
    assert row(job("done"), relpath=".api/0f0f/interview.m4a")["upload"] is True


def test_a_host_row_and_the_throughput_bins():
    """A host is unchecked until a job needs it, down with its error and next try, or up with its
    live runners and their queue summed; the throughput puts each route's figures in its hour and
    leaves hours without jobs empty."""
    state = SimpleNamespace(name="gpu1", checked_at=0.0, failures=0, down_until=0.0, last_error=None, runners=[],
                            in_flight=0)
    assert overview.host_row(state, NOW, no_scrub)["state"] == "unchecked"
    state.failures, state.down_until, state.last_error = 2, NOW + 8, "gpu1: connect failed: refused"
    down = overview.host_row(state, NOW, no_scrub)
    assert (down["state"], down["last_error"], down["retry_in_s"]) == ("down", "gpu1: connect failed: refused", 8.0)
    state.failures, state.down_until, state.last_error, state.checked_at = 0, 0.0, None, NOW - 3
    state.runners = [{"name": "r1", "queue_length": 2, "device": "cuda", "pid": 7, "in_hand": ["x"]},
                     {"name": "r2", "queue_length": 1}]
    up = overview.host_row(state, NOW, no_scrub)
    assert up["state"] == "up" and up["queue_length"] == 3 and up["checked_age_s"] == 3.0
    assert set(up["runners"][0]) == set(overview.RUNNER_FIELDS)  # no pid, no claims: what a person reads
    plot = overview.throughput([(0, "local", 2, 1800.0, 900.0), (2, "remote", 3, 7200.0, 720.0),
                                (2, "local", 1, 360.0, 180.0), (5, "local", 1, 60.0, 30.0)], NOW, 3)
    assert [entry["jobs"] for entry in plot["bins"]] == [2, 0, 4]
    assert plot["bins"][2]["audio_hours"] == 2.1 and plot["bins"][2]["real_time_factor"] == {"remote": 0.1, "local": 0.5}
    assert plot["bins"][1] == {"start": NOW + 3600, "jobs": 0, "audio_hours": 0.0, "real_time_factor": {}}
    assert plot["routes"] == ["local", "remote"]


# ---------------------------------------------------------------- the page in chromium


class Shots:
    """Screenshots of the page's states under the test's tmp folder."""

    def __init__(self, driver, folder: Path):
        self.driver, self.folder = driver, folder
        folder.mkdir(parents=True, exist_ok=True)

    def take(self, name: str) -> Path:
        path = self.folder / f"{name}.png"
        assert self.driver.save_screenshot(str(path)), f"no screenshot {path}"
        return path


RECORD_ROWS = """
window.seen = {};
const note = () => {
  for (const row of document.querySelectorAll('tr[data-job]')) {
    const trail = (window.seen[row.dataset.job] ||= []);
    const step = [row.dataset.stage, row.querySelector('.step')?.firstChild?.textContent || row.dataset.status];
    if (!trail.length || trail.at(-1).join() !== step.join()) trail.push(step);
  }
};
new MutationObserver(note).observe(document.body, {childList: true, subtree: true});
note();
"""

DROP_FILE = """
const [path, zone] = [arguments[0], document.getElementById('drop')];
const input = document.createElement('input');
input.type = 'file'; input.id = 'test-drop-source'; document.body.append(input);
"""
DISPATCH_DROP = """
const input = document.getElementById('test-drop-source');
const transfer = new DataTransfer();
for (const file of input.files) transfer.items.add(file);
document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
input.remove();
"""


def drop_on_zone(driver, path: Path) -> None:
    """Drop `path` on the page's drop zone as a browser does (a drop event carrying the file)."""
    from selenium.webdriver.common.by import By

    driver.execute_script(DROP_FILE)
    driver.find_element(By.ID, "test-drop-source").send_keys(str(path))
    driver.execute_script(DISPATCH_DROP)


ROWS = """
return [...document.querySelectorAll(arguments[0] + ' tr[data-job]')].map(row => ({
  job: row.dataset.job, status: row.dataset.status, stage: row.dataset.stage,
  name: row.querySelector('.name').textContent, text: row.textContent}));
"""


def row_of(driver, name: str, table: str) -> dict | None:
    """The row of the job named `name` in table `table` (active, finished) as the page shows it now:
    {job, status, stage, name, text}; None when there is none. (Read in one script: the page redraws
    its rows as it polls, so a WebElement of one would go stale.)"""
    return next((row for row in driver.execute_script(ROWS, f"#{table}") if row["name"] == name), None)


def host_card(driver, name: str, state: str) -> str | None:
    """The text of GPU host `name`'s card while the page shows it in `state`; None otherwise."""
    return driver.execute_script("const card = document.querySelector(`#hosts [data-host=\"${arguments[0]}\"]`);"
                                 "return card && card.dataset.state === arguments[1] ? card.textContent : null;",
                                 name, state)


def open_transcript(driver, job_id: str) -> None:
    """Click the finished job's name, as a person opens its transcript."""
    driver.execute_script(f"document.querySelector('#finished tr[data-job=\"{job_id}\"] a.name').click()")


def test_page_follows_jobs_through_a_gpu_host_that_goes_down_and_up(tmp_path):
    """In headless chromium: the page loads; a file dropped into the inbox appears, waits while the
    only GPU host is down (shown down, with why), moves on through its stages once the host's sshd
    starts (host up, its runner listed) and ends done, its transcript shown beside its audio with the
    cue under way highlighted and links to JSON/SRT/VTT/TXT; a file dropped on the drop zone becomes a
    job, a file that is not media gets the API's error; the throughput plot draws the hour's audio;
    and the host, its sshd stopped, shows as down again when the next job needs it."""
    from selenium.webdriver.common.by import By

    server = SSHServer()  # not started yet: the GPU host is down until it is
    runner = driver = daemon = None
    try:
        runner = RunnerProcess(tmp_path, server.spool).start()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        (tmp_path / "daemon").mkdir()
        daemon = Daemon(tmp_path / "daemon", api={"listen": f"127.0.0.1:{port}"}, transcription={"provider": "remote"},
                        remote={**FAST_REMOTE, "hosts": [server.host_settings(name="gpu1")]}).start()
        driver = chromium(tmp_path / "chromium")
        shots = Shots(driver, tmp_path / "screenshots")
        driver.get(url + "/")
        wait_for(driver, lambda page: host_card(page, "gpu1", "unchecked"), "the GPU host, not contacted yet")
        assert driver.title == "whisperdrop" and not console_errors(driver)
        shots.take("1-loaded")
        driver.execute_script(RECORD_ROWS)

        (daemon.inbox / "talks").mkdir()
        shutil.copy(JFK, daemon.inbox / "talks" / "jfk.flac")
        down = wait_for(driver, lambda page: host_card(page, "gpu1", "down"), "the GPU host down")
        assert str(server.port) in down or "refused" in down.lower(), down
        wait_for(driver, lambda page: (row := row_of(page, "talks/jfk.flac", "active")) is not None
                 and "waiting for a GPU host" in row["text"], "the job waiting for a GPU host")
        shots.take("2-host-down")

        server.start()
        up = wait_for(driver, lambda page: host_card(page, "gpu1", "up"), "the GPU host up", timeout=180)
        assert "gpu-test" in up  # its runner, by name
        done = wait_for(driver, lambda page: row_of(page, "talks/jfk.flac", "finished"), "the job done")
        assert done["status"] == "done" and "gpu1" in done["text"]
        trail = driver.execute_script("return window.seen")[done["job"]]  # [stage, what the page said], each change
        stages = [stage for stage, _ in trail]
        assert stages[0] in ("new", "extracted") and stages[-1] == "done", trail
        assert ["extracted", "waiting for a GPU host"] in trail, trail
        order = [JOB_STAGES.index(stage) for stage in stages]
        assert order == sorted(order), trail  # forward only (how many remote stages a 2 s poll sees varies)

        open_transcript(driver, done["job"])
        wait_for(driver, lambda page: "country" in page.find_element(By.ID, "cues").text, "the transcript")
        wait_for(driver, lambda page: page.execute_script("return document.getElementById('player').duration > 10"),
                 "the audio loaded in the player")
        driver.execute_script("const player = document.getElementById('player'); player.currentTime = 6.0;")
        now = wait_for(driver, lambda page: page.find_elements(By.CSS_SELECTOR, "#cues li.now"), "the cue at 6 s")[0]
        start = float(now.get_attribute("data-start"))
        later = [float(item.get_attribute("data-start")) for item in driver.find_elements(By.CSS_SELECTOR, "#cues li")]
        assert start <= 6.0 and not [value for value in later if start < value <= 6.0]
        links = {link.get_attribute("data-format"): link.get_attribute("href")
                 for link in driver.find_elements(By.CSS_SELECTOR, "#transcript-links a")}
        assert sorted(links) == ["json", "srt", "txt", "vtt"]
        srt = httpx.get(links["srt"], timeout=30)
        assert srt.status_code == 200 and "country" in srt.text and srt.text.startswith("1\n00:00:00,")
        shots.take("3-transcript")

        speech = write_variant_wav(tmp_path / "upload" / "interview.wav", 3)
        notes = tmp_path / "upload" / "notes.mp3"
        notes.write_text("these are notes, not audio\n" * 50)
        drop_on_zone(driver, speech)
        driver.find_element(By.ID, "files").send_keys(str(notes))
        accepted = wait_for(driver, lambda page: page.find_elements(By.CSS_SELECTOR,
                                                                    '#uploads li[data-file="interview.wav"][data-state="accepted"]'),
                            "the dropped file accepted")[0]
        refused = wait_for(driver, lambda page: page.find_elements(By.CSS_SELECTOR,
                                                                   '#uploads li[data-file="notes.mp3"][data-state="failed"]'),
                           "the file that is not media refused")[0]
        assert "not an audio or video file" in refused.text and "notes.mp3" in refused.text
        uploaded = wait_for(driver, lambda page: row_of(page, "interview.wav", "finished"), "the upload's job done")
        assert uploaded["job"] == accepted.get_attribute("data-job") and uploaded["status"] == "done"
        wait_for(driver, lambda page: page.execute_script(
            "return [...document.querySelectorAll('#plot rect.hours')].some(bar => +bar.getAttribute('height') > 0)"
            " && document.querySelectorAll('#plot polyline[data-route=remote]').length === 1"),
            "the hour's audio as a bar and the remote route's real-time factor as a line in the plot")
        shots.take("4-uploaded")
        if os.environ.get(SCREENSHOT_COPY):  # scripts/screenshot-page: the docs' picture, a transcript shown
            driver.set_window_size(1200, 1080)
            open_transcript(driver, uploaded["job"])
            wait_for(driver, lambda page: "country" in page.find_element(By.ID, "cues").text
                     and page.find_element(By.ID, "transcript-title").text == "interview.wav", "its transcript")
            wait_for(driver, lambda page: page.execute_script("return document.getElementById('player').duration > 10"),
                     "its audio")
            driver.execute_script("document.getElementById('player').currentTime = 6.5;")
            wait_for(driver, lambda page: page.find_elements(By.CSS_SELECTOR, "#cues li.now"), "the cue under way")
            shutil.copy(shots.take("docs"), os.environ[SCREENSHOT_COPY])
            driver.set_window_size(1280, 1000)

        server.stop()
        write_speech_wav(daemon.inbox / "after.wav", 7, 4.0)
        wait_for(driver, lambda page: host_card(page, "gpu1", "down"), "the GPU host down again", timeout=180)
        shots.take("5-host-gone-down")
        assert not console_errors(driver)
    finally:
        if driver is not None:
            driver.quit()
        if daemon is not None:
            assert daemon.stop() == 0
        if runner is not None:
            runner.stop()
        server.cleanup()


def test_a_token_protected_daemon_gives_the_page_its_data_only_with_the_token(tmp_path):
    """With api.token set, the page loads but its data is refused (401), so it asks for the token; a
    wrong token is refused again; the right one, typed once, shows the data and carries an upload
    through the drop zone, and it never appears in a URL the page asked for. Without the token the
    JSON, the audio and the transcripts are refused to any client, and a client-given path reaches
    nothing."""
    from selenium.webdriver.common.by import By

    token = "page-token-7f3a"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (tmp_path / "daemon").mkdir()
    daemon = Daemon(tmp_path / "daemon", api={"listen": f"127.0.0.1:{port}", "token": token}).start()
    driver = None
    try:
        for path in ("/v1/jobs", "/v1/hosts", "/v1/throughput", f"/v1/jobs/{'a' * 64}/audio",
                     f"/v1/jobs/{'a' * 64}/transcript.srt"):
            assert httpx.get(url + path, timeout=30).status_code == 401, path
        assert httpx.get(url + "/", timeout=30).status_code == 200  # the page: no data in it
        authorized = {"Authorization": f"Bearer {token}"}
        for path in ("/v1/jobs/..%2F..%2Fledger.sqlite3/audio", "/v1/jobs/%2Fetc%2Fpasswd/transcript.json",
                     "/page/..%2F..%2Fservice.py", f"/v1/jobs/{'a' * 64}/transcript.sqlite3"):
            answer = httpx.get(url + path, headers=authorized, timeout=30)
            assert answer.status_code == 404 and str(daemon.root) not in answer.text, (path, answer.text)

        driver = chromium(tmp_path / "chromium")
        shots = Shots(driver, tmp_path / "screenshots")
        driver.get(url + "/")
        why = wait_for(driver, lambda page: page.find_element(By.ID, "login-why") if page.find_element(
            By.ID, "login").is_displayed() else None, "the token asked for")
        assert why.get_attribute("data-status") == "401" and "Bearer" in why.text
        assert not driver.find_element(By.ID, "main").is_displayed()
        shots.take("1-token-asked")

        driver.find_element(By.ID, "token").send_keys("not-the-token\n")
        wait_for(driver, lambda page: "refused" in page.find_element(By.ID, "login-why").text, "the wrong token refused")
        driver.find_element(By.ID, "token").send_keys(token + "\n")
        wait_for(driver, lambda page: page.find_element(By.ID, "main").is_displayed(), "the page's data")
        wait_for(driver, lambda page: "every job runs here" in page.find_element(By.ID, "summary").text, "the summary")
        drop_on_zone(driver, write_speech_wav(tmp_path / "short.wav", 2, 3.0))
        wait_for(driver, lambda page: page.find_elements(By.CSS_SELECTOR, '#uploads li[data-state="accepted"]'),
                 "the upload accepted with the token")
        shots.take("2-token-given")
        urls = driver.execute_script("return performance.getEntriesByType('resource').map(entry => entry.name)")
        assert urls and not [seen for seen in urls + [driver.current_url] if token in seen]
    finally:
        if driver is not None:
            driver.quit()
        if daemon is not None:
            assert daemon.stop() == 0
