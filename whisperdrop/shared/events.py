"""Every event the daemon and the runner log, with its fields: the one list of the log schema.

`EVENTS` maps an event name to `Event(fields, says)`. Names are namespaced (`stage.*`, `job.*`,
`host.*`, `runner.*`...); a job's events carry `job_id` (the full 64-digit hex; a terminal shows 12)
and, where the daemon knows it, `path` (relative to the inbox). Every structlog level also adds
`event`, `level`, `ts` and `logger`; a logger may bind `host`. tests/test_events.py checks
every `log.<level>("<event>", ...)` call in the package against this table, and that docs/logs.md's
event table is `markdown()` of the daemon's events: `python -m whisperdrop.shared.events` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    """An event's fields (besides event, level, ts, logger) and what it says, in a sentence."""

    fields: tuple[str, ...]
    says: str
    log: str = "daemon"  # whose log: daemon or runner


def _daemon(fields: str, says: str) -> Event:
    return Event(tuple(fields.split()), says)


def _runner(fields: str, says: str) -> Event:
    return Event(tuple(fields.split()), says, "runner")


EVENTS: dict[str, Event] = {
    # the daemon's life
    "daemon.open_files": _daemon("limit hard raised_from error hint", "At start: the open-file limit in force (the soft limit raised to the hard one)."),
    "daemon.ready": _daemon("pid config inbox outbox provider hosts recovered_jobs", "Started and watching the inbox."),
    "daemon.stopping": _daemon("busy_jobs", "A stop was asked (SIGTERM, SIGINT); every job is parked at once."),
    "daemon.stop_deadline": _daemon("seconds note stacks", "The stop took too long: every thread's stack, then exit."),
    "daemon.stopped": _daemon("clean waited_out seconds", "Stopped; `seconds` from the stop request; `waited_out`: bounded waits that ran out (none on a clean stop)."),
    "daemon.local_unavailable": _daemon("model error hint fallback", "At start: the local model cannot load; `run` exits 1 (every job local) or runs with the local fallback off (`fallback`: off)."),
    "ledger.recovered": _daemon("jobs stages", "At start: unfinished jobs taken up again where they stopped."),
    # one job, in order
    "stage.intake": _daemon("job_id path source_id bytes settle_s hash_s duplicate api", "A settled file taken: hashed, its job found or made."),
    "stage.extract": _daemon("job_id path bytes_in bytes_out duration_s seconds speed codec container prefetched", "Audio extracted to Opus (`speed`: audio s per wall s; `prefetched`: done while the file settled)."),
    "prefetch.done": _daemon("path seconds", "A file closed after writing was hashed and extracted while it settles."),
    "prefetch.skipped": _daemon("path reason", "Early reading of a closed file stopped (gone, unreadable, or changed); intake reads it itself."),
    "prefetch.discarded": _daemon("path reason", "Early work thrown away: the file changed again, too many files wait, or the daemon stops."),
    "stage.upload": _daemon("job_id host bytes audio_bytes resumed_from seconds mbit_s", "Audio on the GPU host (`bytes` sent this attempt)."),
    "stage.submit": _daemon("job_id host", "The job document written on the GPU host."),
    "stage.checksum_mismatch": _daemon("job_id host action", "The runner found the uploaded audio damaged; it is sent again."),
    "transcribe.resumed": _daemon("job_id done_s total_s chunks", "A local transcription stopped part way goes on: its first `done_s` s (`chunks` chunks or windows) are taken from its checkpoint, not decoded again."),
    "stage.transcribe": _daemon("job_id path route host device model duration_s seconds rtf fallback_reason language bytes recovered language_warning returned_to", "Transcribed (`rtf`: seconds per audio second); a warning when an English-only model heard another language; `returned_to` for a fallback handed back to a GPU host."),
    "stage.outbox": _daemon("job_id path output formats already_written after_success seconds", "Outputs written for one source."),
    "job.progress": _daemon("job_id path percent done_s duration_s", "Every `logging.progress_seconds` while a longer transcription runs."),
    "job.done": _daemon("job_id path route host duration_s total_s fallback_reason bytes_source bytes_sent timings cached_from api", "One source done (`cached_from`: served from an earlier run; `api`: an HTTP API request's upload)."),
    "job.retry": _daemon("job_id path stage attempts retry_in_s attempts_left error hint", "A stage failed; tried again after `retry_in_s`."),
    "job.failed": _daemon("job_id path kind error hint moved_to", "A source moved to failed/ beside its error.json (once per source)."),
    "job.parked": _daemon("job_id path stage", "Cut by a stop; its stage starts again at the next start (the ledger has the last one finished)."),
    "job.reopened": _daemon("job_id model cached_model reason", "A done job is transcribed again (its cached Result came from a fallback model)."),
    "job.audio_missing": _daemon("job_id action", "The extracted audio is gone; extracted again."),
    "job.result_missing": _daemon("job_id action", "The cached Result is gone; transcribed again."),
    "intake.skipped": _daemon("path reason", "An inbox file not taken (not a regular file, a temporary name...)."),
    "intake.unreadable": _daemon("path error hint retry", "An inbox file that cannot be read (`retry`: a passing error, such as no file descriptor left; the next rescan takes it again)."),
    "intake.already_done": _daemon("job_id path reason", "A kept file already done is not taken again."),
    "intake.changed": _daemon("job_id path reason", "The file changed after it was taken; the new version is a job of its own."),
    "intake.vanished": _daemon("job_id path", "The file left the inbox before it was done."),
    "library.exists": _daemon("job_id path output action", "Library mode: a file is already at a subtitle's name beside the source; it is left alone and that format not written."),
    # done notifications (notify.webhook, notify.command)
    "notify.sent": _daemon("job_id path outcome target to attempts seconds", "A done or failed notification arrived (`outcome`: done, failed; `target`: webhook, command)."),
    "notify.retry": _daemon("job_id path outcome target to attempt retry_in_s error", "A notification try failed; tried again after `retry_in_s`."),
    "notify.failed": _daemon("job_id path outcome target to attempts error hint", "A notification given up on after its tries; the job itself is done."),
    "notify.dropped": _daemon("job_id target count reason", "Notifications not sent: the queue is full, or the daemon stopped first."),
    # the HTTP API (api.listen)
    "api.listening": _daemon("listen port token trusted_networks max_upload_mb max_connections open_files note", "The HTTP API accepts requests (`token`: whether a bearer token is required; `max_connections`: the bound in force, lowered to fit `open_files`)."),
    "api.unavailable": _daemon("listen error", "The HTTP API could not listen (address in use, not allowed); the daemon does not start."),
    "api.request": _daemon("method path status seconds client", "One HTTP request answered (a refused one is `api.rejected`)."),
    "api.error": _daemon("method path error", "A request ended in an unexpected error (500); the traceback follows in the log."),
    "api.detect_unavailable": _daemon("model error", "`/detect-language` could not load the model that detects (it answers 503; `error` says why)."),
    "api.server": _daemon("message source suppressed", "A warning from the HTTP server itself, each message at most once a minute (`suppressed`: the same ones left out since)."),
    "api.rejected": _daemon("reason status client method path detail count seconds", "What a client did wrong (wrong host or origin, no token, too large, too slow, too many...): the first of a `reason` at once, then one line a minute with the `count` in the last `seconds`; never a traceback."),
    "api.uploads_swept": _daemon("removed reason", "Uploads stored by requests that were cut before they became jobs, removed at start."),
    # routes and hosts
    "route.fallback": _daemon("job_id reason", "A job meant for a GPU host runs locally; `reason` says why."),
    "route.waiting_for_host": _daemon("job_id reason retry_in_s waited_s", "No host usable and no local fallback: waiting."),
    "route.handback": _daemon("job_id path host local_s done_s duration_s local_remaining_s estimate_s returned_to fallback_reason", "A job on the CPU as a fallback stopped at a checkpoint boundary and goes to a GPU host that came back (`local_remaining_s` against the host's `estimate_s`)."),
    "host.down": _daemon("host failures retry_in_s error hint", "A GPU host failed; backed off."),
    "host.probe": _daemon("host ok seconds error watching", "A look at a GPU host that is down (shared by every job that needs it; `watching`: fallbacks on the CPU watching for its return)."),
    "host.up": _daemon("host after_failures found_by", "A GPU host answers again (`found_by`: probe, when a probe found it back)."),
    "host.health_snapshot_failed": _daemon("error", "The hosts' health could not be written for `status`."),
    "remote.poll_failed": _daemon("job_id host error", "Polling a job's state on a host failed; tried again."),
    "remote.abandoned": _daemon("job_id host cleaned error note", "A job given up on a host (fallback or timeout); its remote files removed."),
    "remote.cleanup_failed": _daemon("job_id host error note", "A job's remote files could not be removed; the runner expires them."),
    "transfer.connected": _daemon("seconds cipher", "An SSH connection to a host (the logger binds `host`)."),
    "transfer.host_key_probe_failed": _daemon("error", "The host's key algorithms could not be probed."),
    "transfer.upload": _daemon("job_id bytes audio_bytes resumed_from sha256 seconds mbit_s", "Debug: one upload's transfer figures."),
    "transfer.upload_skipped": _daemon("job_id bytes reason", "The whole audio was on the host already."),
    "transfer.submitted": _daemon("job_id", "Debug: the job document renamed into jobs/."),
    "transfer.close_failed": _daemon("error", "Debug: closing a remote file after an error failed too."),
    "transfer.oversized_document": _daemon("path error", "A remote document larger than the cap; not read."),
    "transfer.unparsable_document": _daemon("path error", "A remote document that is not JSON."),
    "transfer.heartbeat_skipped": _daemon("file reason", "A runner heartbeat that is not a JSON object."),
    # housekeeping
    "watch.inbox_missing": _daemon("inbox retry_seconds", "The inbox folder is gone; looked for again."),
    "watch.inbox_back": _daemon("inbox", "The inbox folder is back."),
    "watch.observer_stuck": _daemon("inbox", "The file-system observer did not stop in time."),
    "watch.on_ready_failed": _daemon("path error", "Handing a settled file to the pipeline failed."),
    "watch.on_closed_failed": _daemon("path", "Starting early work on a closed file failed; the file is still taken when it settles."),
    "watch.scan_failed": _daemon("folder error", "A rescan of the inbox failed; tried again."),
    "watch.watch_failed": _daemon("inbox error", "The observer could not watch the inbox; rescans go on."),
    "transcribe.checkpoint_failed": _daemon("job_id file error", "A local job's checkpoint (state_dir/partial) could not be written or removed; the job goes on (a stop now would start it from zero)."),
    "transcribe.checkpoints_swept": _daemon("removed", "At start: checkpoints of jobs gone or past transcription removed."),
    "results.expired": _daemon("removed older_than_days", "Cached Results older than `results_days` removed."),
    "audio.expired": _daemon("removed older_than_hours",
                             "Extracted audio kept for the page older than `api.keep_audio_hours` removed."),
    "audio.not_kept": _daemon("job_id error", "A done job's extracted audio could not be kept for the page "
                              "(it then has no player); the job is done all the same."),
    "results.expire_failed": _daemon("folder error", "Expiring cached Results failed; tried again later."),
    "metrics.write_failed": _daemon("path error hint", "The metrics file could not be written."),
    "metrics.last_write_late": _daemon("path seconds", "The last metrics write at stop took long."),
    # the runner (its own log on the GPU host)
    "runner.start": _runner("version spool model device compute_type batch_size max_jobs_per_batch gpu backend partition", "The runner started."),
    "runner.model_loaded": _runner("model device compute_type load_s", "The model is loaded."),
    "runner.preload_failed": _runner("model kind error", "The model could not be loaded at start."),
    "runner.cannot_start": _runner("error", "The runner cannot start."),
    "runner.crashed": _runner("error", "The runner ended on an unexpected error."),
    "runner.stopped": _runner("jobs_done jobs_failed in_slurm", "The runner stopped."),
    "runner.job_done": _runner("job_id model device compute_type batch_size jobs_batched audio_s transcribe_s queue_s rtf oom_retries", "A job transcribed (`jobs_batched`: jobs that shared its batches)."),
    "runner.job_failed": _runner("job_id file kind message hint retryable", "A job failed (failed/<job>.json written)."),
    "runner.job_crashed": _runner("job_id", "A job ended on an unexpected error."),
    "runner.batch_crashed": _runner("job_ids", "A shared batch ended on an unexpected error; each of its jobs failed (retryable)."),
    "runner.job_parked": _runner("job_id", "A job given back at a stop."),
    "runner.job_already_done": _runner("job_id", "A job whose Result exists already."),
    "runner.out_of_memory": _runner("job_ids batch_size compute_type next error", "Out of GPU memory; every job of the batch tried again smaller."),
    "runner.claim_returned": _runner("job_id owner", "A dead runner's claim went back to jobs/."),
    "runner.expired": _runner("files older_than_days", "Old spool files removed."),
    "runner.expire_failed": _runner("path error", "Expiring spool files failed."),
    "runner.failure_write_failed": _runner("job_id kind message error", "A failure record could not be written."),
    "runner.reject_failed": _runner("file error", "A bad job document could not be moved aside."),
    "runner.release_failed": _runner("job_id error", "A claim could not be given back."),
    "runner.audio_delete_failed": _runner("path error", "A job's audio could not be removed."),
    "runner.progress_write_failed": _runner("job_id error", "A progress file could not be written."),
    "runner.heartbeat_failed": _runner("error", "The heartbeat could not be written."),
    "runner.spool_error": _runner("action error", "A spool operation failed; tried again."),
    "runner.watch_failed": _runner("error", "Watching jobs/ failed; rescans go on."),
    "runner.watchdog_withheld": _runner("job_id silent_s state", "systemd's watchdog not pinged: the serve loop shows no life."),
    "runner.watchdog_resumed": _runner("", "The watchdog is pinged again."),
    "slurm.sbatch": _runner("argv", "An sbatch command."),
    "slurm.submitted": _runner("batch jobs job_ids slurm_job_id attempts", "Jobs submitted to Slurm."),
    "slurm.submit_failed": _runner("batch jobs error", "sbatch failed."),
    "slurm.record_failed": _runner("batch error", "A submission record could not be written."),
    "slurm.adopted": _runner("job_id slurm_job_id attempt", "A Slurm job found again after a restart."),
    "slurm.state": _runner("job_id slurm_job_id state reason", "Slurm's state or reason changed."),
    "slurm.job_ended": _runner("job_id slurm_job_id attempt outcome", "A Slurm job ended."),
    "slurm.job_killed": _runner("job_id slurm_job_id attempt state kind", "A Slurm job ended without a Result."),
    "slurm.cancel_failed": _runner("job_id slurm_job_id error", "scancel failed."),
    "slurm.cancelled_removed": _runner("job_id slurm_job_id state", "A cancelled job's files removed."),
    "slurm.claim_returned": _runner("job_id reason", "A claim given back to jobs/."),
    "slurm.follow_failed": _runner("job_id slurm_job_id error", "Following a Slurm job failed."),
    "slurm.mark_failed": _runner("job_id error", "A claim could not be marked."),
    "slurm.query_failed": _runner("error", "squeue or sacct failed."),
    "slurm.lock_unavailable": _runner("path error", "The runner's lock file could not be taken; running without it."),
    "slurm.task_start": _runner("job_id", "A compute-node task started."),
    "slurm.task_no_claim": _runner("job_id error done", "A task found no claim for its job."),
    "slurm.task_bad_job": _runner("error", "A task was given a bad job."),
}

ALWAYS = ("exc_info", "stack_info")  # structlog's own keywords, allowed on every event


def markdown(log: str = "daemon") -> str:
    """The table of `log`'s events (daemon or runner) as Markdown, as docs/logs.md shows it."""
    lines = ["| event | fields | says |", "|---|---|---|"]
    for name, event in EVENTS.items():
        if event.log == log:
            fields = ", ".join(f"`{field}`" for field in event.fields)
            lines.append(f"| `{name}` | {fields} | {event.says} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
