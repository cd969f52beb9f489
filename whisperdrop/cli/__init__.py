"""The front ends: every command of `whisperdrop`, the one-shot transcription and the whisper-cli drop-in.

    commands           `whisperdrop COMMAND`: the argument parser and its dispatch (`main`, `runner_main`)
    common             what every command shares: the common flags, loading the config, logging
    transcribe         `whisperdrop transcribe`: its flags and the plan they make
    oneshot            the one-shot run of given files through the daemon's stages (transcribe, whisper-cli)
    report             `status`, `stats` and `doctor`: their options and what they print
    whisper_cli        `whisperdrop-whisper-cli`: run whisper.cpp's command line (`main`)
    whisper_cli_flags  whisper.cpp's flags: parsing, model names, usage text

Heavy modules are imported inside the command that needs them, so `whisperdrop status` starts fast.
This `__init__` imports nothing.

May import: daemon, gpu_runner, engine, outputs, shared.
"""
