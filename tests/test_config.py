"""Configuration: the schema, the shipped config.yaml, validation messages and the lookup order."""

from pathlib import Path

import pytest
import yaml

from whisperdrop.cli.commands import main
from whisperdrop.shared import config, config_schema

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_matches_schema_defaults():
    """The repo's config.yaml is exactly the schema's defaults, so the documentation cannot drift."""
    shipped = yaml.safe_load((REPO / "config.yaml").read_text())
    assert shipped == config.defaults()
    assert (REPO / "config.yaml").read_text() == config_schema.render_default_yaml()


def test_every_option_has_a_description():
    """Every option in the schema documents itself (docs/configuration.md and config.yaml are built from it)."""
    def walk(schema, path=""):
        for key, spec in schema.items():
            if isinstance(spec, dict):
                yield from walk(spec, f"{path}{key}.")
            elif isinstance(spec, config_schema.ListOf):
                yield f"{path}{key}", spec.description
                yield from walk(spec.item, f"{path}{key}[].")
            else:
                yield f"{path}{key}", spec.description
    missing = [path for path, description in walk(config_schema.SCHEMA) if not description.strip()]
    assert missing == []


def test_all_problems_reported_at_once_with_key_paths(tmp_path):
    """A bad config lists every problem with its key path, the value and what was expected."""
    bad = {
        "inbx": "in",
        "watch": {"settle_seconds": "two", "recursive": 1},
        "transcription": {"provider": "gpu", "outputs": ["srt", "pdf"]},
        "remote": {"hosts": [{"name": "a", "port": 70000}]},
    }
    with pytest.raises(config.ConfigError) as caught:
        config.validate(bad, tmp_path)
    text = str(caught.value)
    assert "At 'inbx': unknown key; did you mean 'inbox'?" in text
    assert "At 'watch.settle_seconds': 'two' is str; expected a number" in text
    assert "At 'watch.recursive': 1 is int; expected true or false" in text
    assert "At 'transcription.provider': 'gpu' is not one of auto, remote, local" in text
    assert "pdf" in text and "At 'remote.hosts[0].port'" in text and "At 'remote.hosts[0].host'" in text
    assert len(caught.value.problems) == 7


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    """inbox, outbox and friends are relative to the config file's folder, not the working directory."""
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "config.yaml").write_text("inbox: drop\noutbox: /srv/out\n")
    loaded = config.load(folder / "config.yaml")
    assert loaded.inbox == folder / "drop"
    assert loaded.outbox == Path("/srv/out")
    assert loaded.state_dir == folder / "state"


def test_lookup_order_env_then_cwd(tmp_path, monkeypatch):
    """$WHISPERDROP_CONFIG wins over ./config.yaml; with neither, the embedded default applies."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "search_path", lambda: [tmp_path / "config.yaml"])
    assert config.load().source is None
    (tmp_path / "config.yaml").write_text("inbox: a\n")
    assert config.load().inbox == tmp_path / "a"
    other = tmp_path / "other.yaml"
    other.write_text("inbox: b\n")
    monkeypatch.setenv(config.ENV_VAR, str(other))
    assert config.load().inbox == tmp_path / "b"


def test_missing_explicit_file_is_an_error(tmp_path):
    """-c naming a file that does not exist is an error, not a silent fall back to defaults."""
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")


def test_invalid_yaml_is_reported(tmp_path):
    """A YAML syntax error names the file and says it is not valid YAML."""
    path = tmp_path / "config.yaml"
    path.write_text("inbox: [unclosed\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(path)


def test_missing_inbox_stops_the_daemon_before_it_starts(tmp_path, capsys):
    """`whisperdrop run` with an inbox that does not exist exits 2 naming the key and the fix."""
    path = tmp_path / "config.yaml"
    path.write_text(f"inbox: {tmp_path / 'missing'}\n")
    assert main(["run", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "At 'inbox'" in err and "does not exist" in err and "mkdir" in err


def test_check_config_exits_nonzero_on_a_wrong_type(tmp_path, capsys):
    """`whisperdrop check-config` on a wrong type exits 2 and prints the key path."""
    path = tmp_path / "config.yaml"
    path.write_text("audio:\n  bitrate_kbps: high\n")
    with pytest.raises(SystemExit) as caught:
        main(["check-config", "-c", str(path)])
    assert caught.value.code == 2
    assert "At 'audio.bitrate_kbps': 'high' is str; expected an integer" in capsys.readouterr().err


def test_readme_configuration_reference_is_current():
    """The configuration table of docs/configuration.md is the schema's (regenerate: python scripts/update_readme_config.py)."""
    page = (REPO / "docs" / "configuration.md").read_text()
    start = page.index("<!-- config-reference:start -->\n") + len("<!-- config-reference:start -->\n")
    end = page.index("<!-- config-reference:end -->")
    assert page[start:end] == config_schema.render_markdown_reference()
