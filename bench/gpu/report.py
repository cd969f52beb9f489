"""How the GPU check shows its figures: the Markdown table's rows, the summary to read first, the model's label."""

from __future__ import annotations

import json
from pathlib import Path

from common import Row

SECTION = "gpu"
MODEL_NOTE = "gpu-check-model.json"   # prepare.py leaves it beside the model it carries


def table(report: dict) -> list[Row]:
    """The Markdown table's rows from `report["figures"]`."""
    figures = report["figures"]
    label = f"{report['model_label']} {figures['compute_type']} {report['device_label']}"
    how = (f"median of {figures['rounds']} round(s), order rotating; one loaded model; word timestamps, VAD, beam 5; "
           f"batch_size {figures['batch_size']}")
    runner = (f"; jobs sharing one of the runner's steps: up to {figures['runner']['jobs_batched_max']}, out-of-memory "
              f"retries: {figures['runner']['oom_retries_max']}") if "runner" in figures else ""
    long, short, ratios = figures["long"], figures["short"], figures["ratios"]
    rows = []
    names = {"sequential": "bare WhisperModel.transcribe", "batched": f"bare BatchedInferencePipeline(batch_size={figures['batch_size']})",
             "runner": "runner Worker, one job", "across_jobs": "runner Worker, batches across jobs"}
    groups = [("long", f"{long['audio_s'] / 60:.1f} min speech file ({long['words']} words)")]
    if short["files"]:
        groups.append(("short", f"{short['files']} clips ({short['audio_s']:.0f} s, {short['words']} words) queued at once"))
    for group, what in groups:
        for name in ("sequential", "batched", "runner", "across_jobs"):
            if name not in figures[group]:
                continue
            item = figures[group][name]
            method = names[name] if group == "long" or name == "across_jobs" else f"sum of {names[name]}, one call per file"
            rows.append(Row(SECTION, f"{label}, {what}: {method}", item["seconds"], "s", figures[group]["audio_s"], "audio s",
                            item["rtf"], note=f"(RTF {item['rtf']:.4f}, {item['x_real_time']:.0f}x real time; WER "
                                              f"{item['wer']:.1f} %, {item['text']}; {how}"
                                              f"{runner if name in ('runner', 'across_jobs') else ''})", runs=item["runs"]))
    for key, value in ratios.items():
        rows.append(Row(SECTION, f"{label}: {key.replace('_', ' ')}", value, "x", note="(median of the rounds' ratios)"))
    memory = figures["memory"]
    if memory.get("peak_mib") is not None:
        rows.append(Row(SECTION, f"{label}: peak GPU memory used ({memory['source']})", round(memory["peak_mib"]), "MiB",
                        round(memory["baseline_mib"]), "before the model", note=f"(by phase: {memory['peak_by_phase_mib']})"))
    rows.append(Row(SECTION, f"{label}: peak RSS of the check's process", round(memory["rss_peak_mib"] or 0), "MiB"))
    return rows


def model_label(model: str) -> str:
    """What the model is, from the note prepare.py leaves beside it, else its name."""
    note = Path(model) / MODEL_NOTE
    if note.is_file():
        return json.loads(note.read_text()).get("label", model)
    return model.removeprefix("bundled:")


def summary(report: dict) -> str:
    """The lines to read first: device, libraries, RTFs and ratios."""
    figures = report["figures"]
    lines = [f"GPU CHECK on {report['device_label']} ({figures['device']} {figures['compute_type']}, "
             f"ctranslate2 {report['packages']['ctranslate2']['version']}), {figures['rounds']} round(s) in {report['elapsed_s']} s"]
    cublas = [path for path in report.get("libraries_mapped", []) if "cublas" in path]
    lines.append(f"cuBLAS mapped: {', '.join(cublas) if cublas else 'none'}")
    for group in ("long", "short") if figures["short"]["files"] else ("long",):
        parts = [f"{name} {item['seconds']:.2f} s (RTF {item['rtf']:.4f}, WER {item['wer']:.1f} %)"
                 for name, item in figures[group].items() if isinstance(item, dict)]
        lines.append(f"{group} ({figures[group]['audio_s']:.0f} s of audio): " + "; ".join(parts))
    lines.append("ratios: " + ", ".join(f"{key} {value:.2f}x" for key, value in figures["ratios"].items()))
    memory = figures["memory"]
    if memory.get("peak_mib") is not None:
        lines.append(f"peak GPU memory {memory['peak_mib']:.0f} MiB (before the model {memory['baseline_mib']:.0f} MiB)")
    return "\n".join(lines)
