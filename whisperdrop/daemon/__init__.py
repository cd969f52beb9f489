"""The local side: watcher, extraction, ledger, SSH transport, router, outbox and the pipeline."""
