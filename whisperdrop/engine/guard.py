"""The repetition guard of batched decoding: a chunk whose text loops or is a guess is decoded again
at faster-whisper's fallback temperatures, as its sequential decoding does (its batched pipeline
decodes at temperature 0 only).

- `needs_fallback(output, speech_seconds)`: whether a chunk's decoded text is a guess (an average log
  probability under -1, faster-whisper's rule) or a repetition loop. Unlike faster-whisper, text that
  repeats itself is taken for a loop only when the model is unsure of it or it comes faster than
  speech can, so speech that really repeats (jfk said 25 times) is not decoded again.
- `decode_again(model, tokenizer, options, encoder_output, flagged)`: the flagged chunks of a batch
  decoded again together, one batched generation per temperature over the chunks still failing,
  from the batch's encoder output (no encoder pass of their own).
- `compression_ratio(text)`, `speech_seconds(chunk)`: the figures the rule reads.

Imports `engine.chunks` (for the sample rate); faster-whisper and CTranslate2 on first use.
"""

from __future__ import annotations

from typing import Any

import numpy

from whisperdrop.engine.chunks import SAMPLE_RATE, Chunk

NO_SPEECH_THRESHOLD = 0.6
LOG_PROB_THRESHOLD = -1.0
COMPRESSION_RATIO_THRESHOLD = 2.4  # text that zlib shrinks more than this repeats itself (faster-whisper's threshold)
LOOP_LOG_PROB = -0.5            # ...and is a loop when the model is unsure of it, or when it comes faster than
LOOP_TOKENS_PER_SECOND = 4.0    # this many tokens a second of the chunk's speech. Measured with tiny.en (docs/models.md):
                                # jfk 25 times over, ratio 3.3-3.8 at -0.05 to -0.08 and 2.2-2.4 tokens/s, is speech that
                                # repeats; loops on other languages ran at -0.99 or at 6.5-21 tokens/s
FALLBACK_TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)  # faster-whisper's after 0.0, sampling best_of 5


def compression_ratio(text: str) -> float:
    """How much zlib shrinks `text` (stripped, UTF-8): faster-whisper's measure of a repetition loop."""
    from faster_whisper.transcribe import get_compression_ratio

    text = text.strip()
    return float(get_compression_ratio(text)) if text else 0.0


def needs_fallback(output: dict, speech_seconds: float) -> bool:
    """Whether a chunk's decoded `output` (tokens, avg_logprob, no_speech_prob, compression_ratio),
    from a chunk holding `speech_seconds` of speech, is a guess or a repetition loop to decode again
    at higher temperatures: an average log probability under LOG_PROB_THRESHOLD (faster-whisper's
    rule), or a compression ratio over COMPRESSION_RATIO_THRESHOLD with an average log probability
    under LOOP_LOG_PROB or more than LOOP_TOKENS_PER_SECOND tokens a second of speech. Never what the
    model calls silence (no-speech probability over NO_SPEECH_THRESHOLD with a low log probability,
    which gives no text)."""
    unsure = output["avg_logprob"] < LOG_PROB_THRESHOLD
    if unsure and output["no_speech_prob"] > NO_SPEECH_THRESHOLD:
        return False
    if output["compression_ratio"] <= COMPRESSION_RATIO_THRESHOLD:
        return unsure
    too_fast = len(output["tokens"]) > LOOP_TOKENS_PER_SECOND * speech_seconds
    return unsure or output["avg_logprob"] < LOOP_LOG_PROB or too_fast


def speech_seconds(chunk: Chunk) -> float:
    """Seconds of `chunk` inside the VAD's speech spans (its whole length when it has none)."""
    return (sum(end - start for start, end in chunk.speech) or len(chunk.audio)) / SAMPLE_RATE


def decode_again(model: Any, tokenizer: Any, options: Any, encoder_output: Any,
                 flagged: dict[int, tuple[dict, float]]) -> dict[int, dict]:
    """Decode again the chunks of a batch that failed the guard: `flagged` maps a chunk's position in
    the batch to (its output at temperature 0, its seconds of speech); `encoder_output` is the whole
    batch's, `options` the batch's TranscriptionOptions (prompt, hotwords, beam, penalties).

    For each of FALLBACK_TEMPERATURES in turn, one generation samples `best_of` texts for every chunk
    still failing (faster-whisper's `generate_with_fallback`, batched); a chunk is done at the first
    temperature whose text passes `needs_fallback`. A chunk that fails at every temperature gets the
    best of all its tries, temperature 0 among them: those under the compression ratio threshold
    first, then the highest average log probability, as faster-whisper chooses. Returns each flagged
    position's output (tokens, avg_logprob, no_speech_prob, temperature, compression_ratio). Sampling
    is random (CTranslate2 seeds each thread once): such a chunk may read differently from one run to
    the next, as with sequential decoding. Raises what CTranslate2 raises."""
    prompt = model.get_prompt(  # the prompt generate_segment_batched gave the whole batch
        tokenizer, previous_tokens=tokenizer.encode(options.initial_prompt) if options.initial_prompt else [],
        without_timestamps=True, hotwords=options.hotwords)
    tries = {position: [first] for position, (first, _) in flagged.items()}
    done: dict[int, dict] = {}
    for temperature in FALLBACK_TEMPERATURES:
        failing = [position for position in flagged if position not in done]
        if not failing:
            break
        results = model.model.generate(
            _rows(encoder_output, failing), [list(prompt) for _ in failing], beam_size=1,
            num_hypotheses=options.best_of, sampling_topk=0, sampling_temperature=temperature,
            length_penalty=options.length_penalty, repetition_penalty=options.repetition_penalty,
            no_repeat_ngram_size=options.no_repeat_ngram_size, max_length=model.max_length, return_scores=True,
            return_no_speech_prob=True, suppress_blank=options.suppress_blank, suppress_tokens=options.suppress_tokens,
            max_initial_timestamp_index=int(round(options.max_initial_timestamp / model.time_precision)))
        for position, result in zip(failing, results):
            tokens = result.sequences_ids[0]
            cumulative = result.scores[0] * (len(tokens) ** options.length_penalty)
            output = {"tokens": tokens, "avg_logprob": cumulative / (len(tokens) + 1),
                      "no_speech_prob": result.no_speech_prob, "temperature": temperature,
                      "compression_ratio": compression_ratio(tokenizer.decode(tokens))}
            tries[position].append(output)
            if not needs_fallback(output, flagged[position][1]):
                done[position] = output
    for position, outputs in tries.items():
        if position not in done:
            done[position] = max([output for output in outputs if output["compression_ratio"] <= COMPRESSION_RATIO_THRESHOLD]
                                 or outputs, key=lambda output: output["avg_logprob"])
    return done


def _rows(encoder_output: Any, rows: list[int]) -> Any:
    """The encoder output of the batch's chunks at `rows`, as a CTranslate2 StorageView (a copy through
    the host memory; generation moves it to the model's device, as for faster-whisper's multi-GPU encoder)."""
    import ctranslate2

    if rows == list(range(encoder_output.shape[0])):
        return encoder_output
    host = encoder_output if encoder_output.device == "cpu" else encoder_output.to_device(ctranslate2.Device.cpu)
    return ctranslate2.StorageView.from_array(numpy.ascontiguousarray(numpy.asarray(host)[rows]))
