"""The API's response bodies, rendered from a Result: the original plan's shape, the OpenAI
transcription API's formats, and whisper-asr-webservice's `/asr` outputs. Pure functions.

SRT and VTT come from `whisperdrop.outputs.subtitles` (cues cut from word timestamps within `subtitles`'
limits), the same files the outbox gets.
"""

from __future__ import annotations

import json

from whisperdrop.outputs.subtitles import Limits, render_srt, render_vtt

OPENAI_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
ASR_OUTPUTS = ("txt", "vtt", "srt", "tsv", "json")
MEDIA_TYPES = {"json": "application/json", "verbose_json": "application/json", "text": "text/plain",
               "txt": "text/plain", "srt": "text/plain", "vtt": "text/vtt", "tsv": "text/tab-separated-values"}

# Whisper's languages (code -> the lowercase English name OpenAI's verbose_json and /detect-language give).
LANGUAGES = dict(item.split(":") for item in (
    "en:english zh:chinese de:german es:spanish ru:russian ko:korean fr:french ja:japanese pt:portuguese "
    "tr:turkish pl:polish ca:catalan nl:dutch ar:arabic sv:swedish it:italian id:indonesian hi:hindi fi:finnish "
    "vi:vietnamese he:hebrew uk:ukrainian el:greek ms:malay cs:czech ro:romanian da:danish hu:hungarian ta:tamil "
    "no:norwegian th:thai ur:urdu hr:croatian bg:bulgarian lt:lithuanian la:latin mi:maori ml:malayalam cy:welsh "
    "sk:slovak te:telugu fa:persian lv:latvian bn:bengali sr:serbian az:azerbaijani sl:slovenian kn:kannada "
    "et:estonian mk:macedonian br:breton eu:basque is:icelandic hy:armenian ne:nepali mn:mongolian bs:bosnian "
    "kk:kazakh sq:albanian sw:swahili gl:galician mr:marathi pa:punjabi si:sinhala km:khmer sn:shona yo:yoruba "
    "so:somali af:afrikaans oc:occitan ka:georgian be:belarusian tg:tajik sd:sindhi gu:gujarati am:amharic "
    "yi:yiddish lo:lao uz:uzbek fo:faroese ht:haitian_creole ps:pashto tk:turkmen nn:nynorsk mt:maltese "
    "sa:sanskrit lb:luxembourgish my:myanmar bo:tibetan tl:tagalog mg:malagasy as:assamese tt:tatar haw:hawaiian "
    "ln:lingala ha:hausa ba:bashkir jw:javanese su:sundanese yue:cantonese").split())
LANGUAGES = {code: name.replace("_", " ") for code, name in LANGUAGES.items()}


def language_name(code: str | None) -> str:
    """Whisper's English name of a language code (`en` -> `english`); the code itself when unknown."""
    return LANGUAGES.get(code or "", code or "")


def language_code(value: str | None) -> str | None:
    """A request's language as a Whisper code: a code, or a name (`english`), lowercased; None for
    none or `auto`. Raises ValueError naming an unknown language."""
    if value is None or not value.strip() or value.strip().lower() == "auto":
        return None
    wanted = value.strip().lower()
    if wanted in LANGUAGES:
        return wanted
    for code, name in LANGUAGES.items():
        if name == wanted:
            return code
    raise ValueError(f"unknown language {value!r}: give a Whisper language code (en, pt, de...) or 'auto'")


def native(result: dict, extra: dict) -> dict:
    """The original plan's `POST /transcribe` body: text, language, segments of start, end, text;
    then `extra` (job id, route, host, fallback reason...)."""
    segments = [{"start": segment["start"], "end": segment["end"], "text": segment["text"]}
                for segment in result.get("segments") or []]
    return {"text": result.get("text", ""), "language": result.get("language"), "segments": segments, **extra}


# OpenAI's verbose_json segment fields beyond id, start, end and text, as the engine records them.
OPENAI_SEGMENT_FIELDS = ("seek", "tokens", "temperature", "avg_logprob", "compression_ratio", "no_speech_prob")


def openai_segment(segment: dict, index: int) -> dict:
    """One segment as OpenAI's verbose_json gives it: id, start, end, text, and each of its decoding
    figures the Result holds (a Result cached before the engine kept one leaves that field out)."""
    body = {"id": index, "start": segment["start"], "end": segment["end"], "text": segment.get("text", "")}
    body.update({key: segment[key] for key in OPENAI_SEGMENT_FIELDS if segment.get(key) is not None})
    return body


def openai_words(result: dict) -> list[dict]:
    return [{"word": word["word"], "start": word["start"], "end": word["end"]}
            for segment in result.get("segments") or [] for word in segment.get("words") or []]


def openai(result: dict, response_format: str, granularities: list[str], task: str, limits: Limits,
           extra: dict) -> tuple[str | dict, str]:
    """(body, media type) for OpenAI's `response_format`: json {"text"}, text, srt, vtt, or
    verbose_json (task, language name, duration, text, segments, and words when asked for)."""
    if response_format == "text":
        return result.get("text", "").strip() + "\n", MEDIA_TYPES["text"]
    if response_format == "srt":
        return render_srt(result, limits), MEDIA_TYPES["srt"]
    if response_format == "vtt":
        return render_vtt(result, limits), MEDIA_TYPES["vtt"]
    if response_format == "json":
        return {"text": result.get("text", "").strip(), **extra}, MEDIA_TYPES["json"]
    body = {"task": task, "language": language_name(result.get("language")),
            "duration": result.get("duration", 0.0), "text": result.get("text", "").strip()}
    if task == "transcribe":  # OpenAI bills transcriptions by the second and says so; translations carry none
        body["usage"] = {"type": "duration", "seconds": result.get("duration", 0.0)}
    if "segment" in granularities or not granularities:
        body["segments"] = [openai_segment(segment, index) for index, segment in enumerate(result.get("segments") or [])]
    if "word" in granularities:
        body["words"] = openai_words(result)
    return {**body, **extra}, MEDIA_TYPES["verbose_json"]


def asr(result: dict, output: str, limits: Limits) -> tuple[str, str]:
    """(body, media type) for `/asr`'s `output`: txt, vtt, srt, tsv (start and end in integer
    milliseconds), or json (text, segments with their words, language)."""
    segments = result.get("segments") or []
    if output == "txt":
        return "".join(segment["text"].strip() + "\n" for segment in segments), MEDIA_TYPES["txt"]
    if output == "srt":
        return render_srt(result, limits), MEDIA_TYPES["srt"]
    if output == "vtt":
        return render_vtt(result, limits), MEDIA_TYPES["vtt"]
    if output == "tsv":
        lines = ["start\tend\ttext"] + [
            f"{round(1000 * segment['start'])}\t{round(1000 * segment['end'])}\t"
            f"{segment['text'].strip().replace(chr(9), ' ')}" for segment in segments]
        return "\n".join(lines) + "\n", MEDIA_TYPES["tsv"]
    document = {"text": result.get("text", ""), "language": result.get("language"),
                "segments": [{**openai_segment(segment, index), "words": segment.get("words") or []}
                             for index, segment in enumerate(segments)]}
    return json.dumps(document, ensure_ascii=False), MEDIA_TYPES["json"]
