"""whisperdrop: drop media into an inbox, get transcripts in an outbox (faster-whisper, local or over SSH)."""

__version__ = "0.1.0"
