"""The plumbing both sides share (the daemon and the GPU runner), and the front ends with them.

    config          load and validate the config file (`load`, `Config`, `ConfigError`)
    config_schema   every option once: its type, default and description; the generated config.yaml and reference
    config_checks   what stops `run` or `runner` from starting (folders, keys, profiles), the file's role
    profiles        per-folder profiles and per-job options: the `Plan` of one job
    model_names     what a model's name says (English-only or multilingual)
    spool           the spool protocol: layout on the GPU host, job ids, job and result documents
    files           atomic durable writes, file hashing, `Cancelled`
    log             structured logging (JSON lines, or a readable console)
    events          every event the daemon and the runner log, with its fields
    errors          `WhisperdropError`, the one base of whisperdrop's errors
    notify          sd_notify for systemd (ready, watchdog, status)

This `__init__` imports nothing.

May import: nothing else in whisperdrop.
"""
