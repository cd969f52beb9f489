"""One error model: every layer's failures are WhisperdropErrors carrying kind, retryable and hint."""

from __future__ import annotations

import pickle
from pathlib import Path

from whisperdrop.daemon.connection import AuthError, HostError, HostKeyError
from whisperdrop.daemon.extract import MediaError
from whisperdrop.daemon.stages import Permanent
from whisperdrop.engine.engine import EngineError
from whisperdrop.gpu_runner.claim import Failure as _Failure
from whisperdrop.shared.errors import WhisperdropError


def test_media_errors_are_permanent_with_their_hint_and_survive_pickling():
    """A MediaError is kind media, not retryable, keeps its hint, and crosses a process pool intact."""
    error = MediaError(Path("inbox/a.mp3"), "no audio stream", "re-export it with sound")
    assert isinstance(error, WhisperdropError)
    assert (error.kind, error.retryable, error.hint) == ("media", False, "re-export it with sound")
    again = pickle.loads(pickle.dumps(error))
    assert (again.path, again.reason, again.hint, str(again)) == (error.path, error.reason, error.hint, str(error))


def test_host_errors_are_retryable_exactly_when_transient():
    """A HostError's retryable follows transient; host key and auth errors are never retryable."""
    down = HostError("gpu1", "connect", "refused", transient=True, hint="start sshd")
    assert (down.kind, down.retryable, down.hint) == ("host", True, "start sshd")
    assert str(down) == "host gpu1: connect failed (transient): refused; start sshd"
    for error in (HostKeyError("gpu1", "connect", "changed", transient=False, hint="ssh-keygen -R gpu1"),
                  AuthError("gpu1", "connect", "refused key", transient=False)):
        assert isinstance(error, WhisperdropError) and error.retryable is False and error.kind == "host"


def test_permanent_failures_are_never_retryable():
    """Permanent keeps the kind and hint it is given and is never retryable."""
    error = Permanent("audio", "cannot decode", "re-export it")
    assert isinstance(error, WhisperdropError)
    assert (error.kind, error.retryable, error.hint, str(error)) == ("audio", False, "re-export it", "cannot decode")


def test_the_base_has_defaults_a_subclass_or_call_can_override():
    """WhisperdropError defaults to kind error, not retryable, no hint; each can be given."""
    plain = WhisperdropError("boom")
    assert (plain.kind, plain.retryable, plain.hint) == ("error", False, "")
    given = WhisperdropError("busy", kind="oom", retryable=True, hint="smaller batch")
    assert (given.kind, given.retryable, given.hint) == ("oom", True, "smaller batch")


def test_engine_errors_and_runner_failures_share_the_base():
    """EngineError and the runner's job failures carry kind, retryable and hint through the same base."""
    oom = EngineError("out of memory", kind="oom", retryable=True)
    assert isinstance(oom, WhisperdropError) and (oom.kind, oom.retryable) == ("oom", True)
    assert EngineError("bad").kind == "engine" and EngineError("bad").retryable is False
    failure = _Failure("checksum", "sha256 differs", True)
    assert isinstance(failure, WhisperdropError)
    assert (failure.kind, failure.retryable, str(failure)) == ("checksum", True, "sha256 differs")
    assert failure.hint  # the runner's hint for its kind
