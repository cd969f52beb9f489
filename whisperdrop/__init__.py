"""whisperdrop: drop media into an inbox, get transcripts in an outbox (faster-whisper, local or over SSH).

One folder per kind of code; imports point one way, and tests/test_layout.py checks it (no cycle,
nothing against this rule):

    cli -> daemon | gpu_runner -> engine, outputs -> shared

    cli/         every command and the one-shot front ends (`whisperdrop`, `whisperdrop-whisper-cli`)
    daemon/      the local side: watch, extract, ledger, SSH transport, routing, outbox, pipeline, HTTP API
    gpu_runner/  the GPU side: a runner (or a Slurm backend) over a spool directory
    engine/      transcription: faster-whisper, batched decoding, chunks and VAD, checkpoints
    outputs/     what a Result becomes: the Result document, subtitles, whisper.cpp's formats
    shared/      the plumbing every side uses: config, profiles, spool protocol, files, log, events, errors

`daemon` and `gpu_runner` never import each other: they meet in `shared.spool` and `engine`. This
module holds only `__version__`, which any module may import.
"""

__version__ = "0.1.0"
