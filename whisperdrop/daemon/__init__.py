"""The local side: watcher, extraction, ledger, SSH transport, router, outbox and the pipeline.

`service.serve` starts it: the inbox watcher (`watch`, `settle`) feeds the `pipeline`, whose stage
table (`stages`) moves each job through intake, `extract`, the route (`local`, or `remote` with its
`remote_steps` over `transfer` and `connection`) and `delivery` to the `outbox`. `api/` is the HTTP API.
This `__init__` imports nothing.

May import: engine, outputs, shared.
"""
