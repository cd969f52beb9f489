"""The transcription engine: faster-whisper behind one call that the GPU runner and the daemon's local
route share, so both routes make the same Result.

    engine      `Engine`: load a model (cached), transcribe one file or several in shared batches
    batched     batched decoding: speech chunks of one or several files fill each batch
    guard       the repetition guard: a batch's chunks that loop or guess, decoded again at higher temperatures
    segments    a job's segments put together from its chunks: in order, never overlapping, never repeated
    chunks      audio decoded in bounded blocks, VAD, speech chunks cut where there is no speech
    checkpoint  a long transcription's finished windows on disk, so a restart goes on from there

This `__init__` imports nothing.

May import: shared.
"""
