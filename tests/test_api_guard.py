"""The API's front door and bounds as pure parts (no daemon): which Host names and Origins are the
daemon's own, who may call without a token, how many connections fit the open-file limit, how
refusals are counted into log lines, and the names API jobs' outputs get."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from whisperdrop.shared import config as config_module
from whisperdrop.shared import log
from whisperdrop.daemon.api.connections import RESERVED_FILES, connection_limit
from whisperdrop.daemon.api.guard import Callers, Hosts, InFlight, Origins, address_of, host_name, origin_of
from whisperdrop.daemon.api.rejections import Rejections
from whisperdrop.daemon.api.uploads import is_generic, output_stem, safe_name


def test_host_names_the_daemon_answers_to():
    """localhost names, loopback addresses, the listen name, the address the request came in on and
    api.allowed_hosts (exact, `*.domain`) are the daemon's; any other name, a rebinding page's, is not."""
    hosts = Hosts("0.0.0.0", ["whisper.example", "*.lan.example"])
    assert all(hosts.allows(name, "192.168.1.5") for name in (
        "localhost:8765", "LOCALHOST", "app.localhost", "127.0.0.1:8765", "[::1]:8765", "192.168.1.5:8765",
        "whisper.example", "whisper.example.:8765", "box.lan.example"))
    assert not any(hosts.allows(name, "192.168.1.5") for name in (
        "attacker.example", "192.168.1.6", "lan.example.attacker.example", "localhost.attacker.example",
        "whisper.example.attacker.example", ""))
    named = Hosts("whisper.lan", [])
    assert named.allows("whisper.lan:8765", "10.0.0.2") and not named.allows("other.lan", "10.0.0.2")
    assert Hosts("127.0.0.1", ["*"]).allows("anything.example", "127.0.0.1")
    assert host_name("[fe80::1]:80") == "fe80::1" and host_name("Box.Example.:80") == "box.example"


def test_origins_that_may_change_state():
    """The daemon's own origin (scheme and Host, default port or not) and api.allowed_origins may;
    another site, `null` and garbage may not."""
    origins = Origins(["https://webui.example", "http://app.example:8080/"])
    assert origins.allows("http://127.0.0.1:8765", "http", "127.0.0.1:8765")
    assert origins.allows("http://whisper.lan", "http", "whisper.lan:80")
    assert origins.allows("https://webui.example:443", "http", "127.0.0.1:8765")
    assert origins.allows("http://app.example:8080", "http", "127.0.0.1:8765")
    for origin in ("http://attacker.example", "null", "http://127.0.0.1:9999", "https://127.0.0.1:8765", "x"):
        assert not origins.allows(origin, "http", "127.0.0.1:8765"), origin
    assert origin_of("HTTP://[::1]:80") == "http://[::1]"


def test_who_may_call_without_a_token():
    """A trusted network needs no token (IPv4-mapped addresses included); others need the token, or
    without one configured, loopback; a wrong token is 401, an untrusted address without a token 403."""
    callers = Callers("s3cret", ["10.0.0.0/24", "fd00::/8"])
    assert callers.refusal("10.0.0.7", None) is None and callers.refusal("::ffff:10.0.0.7", None) is None
    assert callers.refusal("fd00::5", None) is None
    assert callers.refusal("10.0.1.7", None)[0] == 401
    assert callers.refusal("10.0.1.7", b"Bearer s3cret") is None
    assert callers.refusal("127.0.0.1", None)[0] == 401  # loopback needs the token when there is one, as before
    tokenless = Callers(None, ["192.168.5.0/24"])
    assert tokenless.refusal("127.0.0.1", None) is None and tokenless.refusal("192.168.5.9", None) is None
    status, reason, message = tokenless.refusal("192.168.6.9", None)
    assert status == 403 and reason == "not_trusted" and "api.trusted_networks" in message
    assert address_of("not an address") is None and address_of("[::1]") is not None


def test_connection_bound_leaves_the_reserve_free():
    """api.max_connections stands where the open-file limit has room; under a low limit it is lowered so
    the reserve (inbox, ledger, SSH) stays free, and never below a handful."""
    assert connection_limit(256, 65536, 32) == 256
    lowered = connection_limit(1000, 1024, 32)
    assert lowered < 1000 and lowered + RESERVED_FILES < 1024
    assert connection_limit(256, 100, 32) == 8


def test_refusals_are_one_line_per_reason_per_interval():
    """The first refusal of a reason is logged at once; the next ones in the interval only counted and
    written as one line when it ends; a quiet reason is forgotten, and its next refusal logged at once."""
    stream = io.StringIO()
    log.configure(fmt="json", stream=stream)
    try:
        clock = [0.0]
        rejections = Rejections(interval=60.0, clock=lambda: clock[0])
        for index in range(1000):
            rejections.note("head_timeout", client=f"10.0.0.{index % 250}")
        rejections.note("wrong_host", status=421)
        clock[0] = 30.0
        rejections.flush()
        clock[0] = 61.0
        rejections.flush()
        clock[0] = 122.0
        rejections.flush()
        rejections.note("head_timeout")
    finally:
        log.configure(fmt="json")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["reason"], line["count"]) for line in lines] == [
        ("head_timeout", 1), ("wrong_host", 1), ("head_timeout", 999), ("head_timeout", 1)]
    assert lines[2]["seconds"] == 61.0 and lines[2]["client"] == "10.0.0.249"
    assert rejections.totals == {"head_timeout": 1001, "wrong_host": 1}


def test_uploads_in_flight_count_and_bytes(tmp_path):
    """Stored uploads (folders) and bodies being read count against both bounds; a body done reading
    frees its share (its stored folder counts from then on)."""
    folder = tmp_path / "uploads"
    (folder / ".incoming").mkdir(parents=True)
    (folder / "a").mkdir()
    (folder / "a" / "x.wav").write_bytes(b"0" * 400)
    in_flight = InFlight(folder, max_count=3, max_bytes=1000)
    assert in_flight.admit(1, 500) is None
    assert "max_uploads_in_flight_mb" in in_flight.admit(2, 200)  # 400 stored + 500 reserved + 200 > 1000
    assert in_flight.admit(2, None) is None  # chunked: counted as it comes
    assert not in_flight.read(2, 150)
    assert "max_uploads_in_flight" in in_flight.admit(3, 1)  # 1 stored + 2 arriving
    in_flight.done(1)
    in_flight.done(2)
    assert in_flight.snapshot() == {"in_flight": 1, "max": 3, "bytes": 400, "max_bytes": 1000}


def test_output_names_of_api_jobs():
    """video_file names the outputs (base name, made safe like an upload's name, its extension off);
    else the upload's name; a generic name (audio_file, blob, a UUID) gives the date and the job id."""
    job = "0123456789abcdef" * 4
    taken = 1_780_000_000.0  # 2026-05-28 UTC
    assert output_stem("Show.S01E02.mkv", "audio_file", job, taken) == "Show.S01E02"
    assert output_stem("/media/tv/The Office (US) - S01E01 - Pilot.mkv", None, job, taken) == \
        "The_Office_US_-_S01E01_-_Pilot"
    assert output_stem("C:\\Videos\\Film.2019.mp4", None, job, taken) == "Film.2019"
    assert output_stem("Show.S01E02", None, job, taken) == "Show.S01E02"  # no media extension: nothing cut
    assert output_stem("../../etc/passwd", None, job, taken) == "passwd"
    assert output_stem(None, "lecture.flac", job, taken) == "lecture"
    assert output_stem("Film (2019).mkv", None, job, taken) == "Film_2019"
    dated = output_stem(None, "audio_file", job, taken)
    assert dated.endswith("-0123456789ab") and dated[:4] == "2026" and len(dated) == len("2026-05-28-0123456789ab")
    for generic in ("audio_file", "file", "blob", "upload", "3f2b8c1e-1234-4abc-9def-0123456789ab",
                    "tmpk2j3h4x9", "a" * 32):
        assert is_generic(generic), generic
    assert output_stem(None, "3f2b8c1e-1234-4abc-9def-0123456789ab.mp3", job, taken) == dated
    assert output_stem("...", "blob", job, taken) == dated
    assert safe_name("a\x00b\r\nc\u202e.wav") == "a_b_c_.wav" and len(safe_name("x" * 300)) == 100


def run_check_config(tmp_path: Path, api: dict) -> subprocess.CompletedProcess:
    for name in ("inbox", "outbox", "archive", "failed", "state"):
        (tmp_path / name).mkdir(exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"state_dir": "state", "api": api}))
    return subprocess.run([sys.executable, "-m", "whisperdrop", "check-config", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


def test_check_config_and_trusted_networks(tmp_path):
    """check-config refuses a non-loopback listen with neither a token nor trusted networks; with
    trusted networks it accepts it and warns that those clients are unauthenticated; a bad network,
    and room in flight for less than one largest upload, are problems naming the key."""
    refused = run_check_config(tmp_path, {"listen": "0.0.0.0:8765"})
    assert refused.returncode == 1 and "api.trusted_networks" in refused.stderr
    accepted = run_check_config(tmp_path, {"listen": "0.0.0.0:8765", "trusted_networks": ["172.18.0.0/16"]})
    assert accepted.returncode == 0, accepted.stderr
    assert "172.18.0.0/16" in accepted.stderr and "WITHOUT a token" in accepted.stderr
    with pytest.raises(config_module.ConfigError, match=r"api.trusted_networks.*not-a-network"):
        config_module.validate({"api": {"trusted_networks": ["10.0.0.0/8", "not-a-network"]}}, tmp_path)
    small = run_check_config(tmp_path, {"listen": "127.0.0.1:8765", "max_uploads_in_flight_mb": 100})
    assert small.returncode == 1 and "api.max_uploads_in_flight_mb" in small.stderr
