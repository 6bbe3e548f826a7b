"""Hooks up the conformance suite's pytest plugin (``conformance/plugin.py``).

Run: ``pytest conformance --backend NAME`` (or ``CTREF_BACKEND=NAME``; default ``reference``),
``-n 2`` for pytest-xdist, ``--report-dir DIR`` for the JUnit XML, JSON and Markdown reports.
"""

from conformance.plugin import (  # noqa: F401  (pytest finds hooks and fixtures by name here)
    harness,
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_generate_tests,
    pytest_report_header,
    pytest_runtest_makereport,
    pytest_unconfigure,
    record,
)
