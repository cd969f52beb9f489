"""Regenerate the configuration reference table in README.md from the schema (tests check it)."""

import re
from pathlib import Path

from whisperdrop.shared.config_schema import render_markdown_reference

README = Path(__file__).resolve().parents[1] / "README.md"
text = README.read_text()
block = f"<!-- config-reference:start -->\n{render_markdown_reference()}<!-- config-reference:end -->"
README.write_text(re.sub(r"<!-- config-reference:start -->.*?<!-- config-reference:end -->", lambda _: block, text, flags=re.S))
