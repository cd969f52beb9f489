"""Issue 13, item 15: the docs say what a Result holds, local and remote (docs/results.md), and the
benchmark table lives in bench/README.md so the README stays short (issue 18)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def result_section() -> str:
    page = (REPO / "docs" / "results.md").read_text()
    return page.split("## The Result", 1)[1].split("\n## ", 1)[0]


def test_readme_documents_every_timing_a_remote_result_carries():
    """runner_s and load_s (from the runner and the engine) are documented with the other timings."""
    section = result_section()
    for key in ("settle_s", "extract_s", "load_s", "transcribe_s", "upload_s", "queue_s", "runner_s", "fetch_s",
                "total_s"):
        assert f"`{key}`" in section, key


def test_readme_says_a_local_result_has_an_empty_transfer():
    """The Result section does not promise transfer fields to a local job, whose Result has `"transfer": {}`."""
    section = " ".join(result_section().split())
    assert "`{}` for a job transcribed here" in section


def test_benchmark_table_lives_in_bench_readme():
    """The full benchmark table is in bench/README.md; the README keeps a summary and a link to it."""
    readme = (REPO / "README.md").read_text()
    bench = (REPO / "bench" / "README.md").read_text()
    assert "| idle daemon memory (RSS)" not in readme and "| idle daemon memory (RSS)" in bench
    assert "## The full table" in bench and "bench/README.md#the-full-table" in readme
    benchmarks = readme.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    assert len(benchmarks.splitlines()) < 80  # a summary, not the table


def test_readme_names_the_multilingual_models_and_the_language_warning():
    """The Models page says which models are English-only and which to use for other languages;
    the Result section documents language_warning."""
    models = (REPO / "docs" / "models.md").read_text()
    assert "English only" in models and "`large-v3`" in models and "`small`" in models
    assert "`language_warning`" in result_section()


def test_quick_start_says_tiny_en_is_the_demo_model_and_how_to_get_a_better_one():
    """The quick start says tiny.en is the offline demo model, how to get a better one (a model name
    with a network, a CTranslate2 folder without one) and its cost, linking the Models page, which
    holds the measured figures and the command that printed them (issue 22, item 6)."""
    readme = (REPO / "README.md").read_text()
    quick_start = " ".join(readme.split("## Quick start", 1)[1].split("\n## ", 1)[0].split())
    assert "`tiny.en` is the offline demo model" in quick_start
    assert "`local.model`" in quick_start and "CTranslate2 model folder" in quick_start and "network" in quick_start
    assert "memory" in quick_start and "docs/models.md#a-better-model-than-tinyen" in quick_start
    models = (REPO / "docs" / "models.md").read_text()
    section = models.split("## A better model than tiny.en", 1)[1].split("\n## ", 1)[0]
    assert "| `bundled:tiny.en` |" in section and "peak memory" in section
    assert "bench/run.py --only models" in section
