"""The fixture catalog in tests: loaded once per process, and a skip for cases whose formats
are still being written elsewhere (they turn on when the format lands)."""

from __future__ import annotations

import pytest

from ctref.fixtures.catalog import load_catalog

CATALOG = load_catalog()


def skip_unregistered(name: str) -> None:
    """Skip the calling test when case ``name`` needs a format ``ctref.formats`` lacks."""
    missing = CATALOG.case(name).unregistered_formats
    if missing:
        pytest.skip(f"format(s) {', '.join(missing)} not registered in ctref.formats yet")
