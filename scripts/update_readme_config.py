"""Regenerate the configuration reference table in docs/configuration.md from the schema (tests check it).

    python scripts/update_readme_config.py           # rewrite the table in place
    python scripts/update_readme_config.py --check   # exit 1, saying so, when the table is not the schema's
"""

import re
import sys
from pathlib import Path

from whisperdrop.shared.config_schema import render_markdown_reference

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
MARKERS = re.compile(r"<!-- config-reference:start -->.*?<!-- config-reference:end -->", flags=re.S)

text = PAGE.read_text()
if not MARKERS.search(text):
    sys.exit(f"{PAGE}: no <!-- config-reference:start --> ... <!-- config-reference:end --> block to fill")
block = f"<!-- config-reference:start -->\n{render_markdown_reference()}<!-- config-reference:end -->"
updated = MARKERS.sub(lambda _: block, text)
if "--check" in sys.argv[1:]:
    if updated != text:
        sys.exit(f"{PAGE}: the configuration reference differs from the schema; "
                 "run python scripts/update_readme_config.py")
    print(f"{PAGE}: the configuration reference is the schema's")
else:
    PAGE.write_text(updated)
