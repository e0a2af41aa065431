"""Write docs/config.md from the config models (run after adding or changing a config key: `make config-docs`)."""

from __future__ import annotations

from pathlib import Path

from lookalike.config_doc import config_page
from lookalike.core.atomic import write_text_atomic

PAGE = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def main() -> None:
    """Regenerate the page; tests/test_setup.py fails while it differs from the models."""
    write_text_atomic(PAGE, config_page())
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
