"""What a Result becomes on disk: the Result document and the formats made from it.

    result       the Result document (schema `whisperdrop.result/1`), built in one place for every route
    subtitles    cues from word timestamps, rendered as SRT and WebVTT
    whisper_cpp  whisper.cpp's files and printed transcript (txt, vtt, srt, csv, lrc, json)
    words        the pieces whisper timed, grouped into the words of the text (for subtitles and -ml)

Pure functions over dicts: nothing here reads the config file, the network or the engine.
This `__init__` imports nothing.

May import: shared.
"""
