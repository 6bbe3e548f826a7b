"""Shared test configuration: hypothesis profiles, one torch thread per xdist worker, and the
generated fixture catalog (``cache``).

The CI has minutes on two cores, so the default profile ``ci`` runs few examples and no deadline
(a first call into torch can take a second and would otherwise be reported as flaky). Pick another
profile with ``CTREF_HYPOTHESIS_PROFILE=thorough`` (or hypothesis' own ``--hypothesis-profile``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("CTREF_HYPOTHESIS_PROFILE", "ci"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each worker's default intra-op pool spans every core; with -n N they oversubscribe the
    # machine and the many small tensor ops of the tests run several times slower.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole catalog, generated once per test session and shared by xdist workers."""
    # Imported here, so that only the tests using generated fixtures load the catalog.
    from catalog_helpers import CATALOG

    from ctref.fixtures.generate import generate

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "ctref-fixtures"
    summary = generate(root, catalog=CATALOG, log=io.StringIO())
    broken = {
        n: e for n, e in summary["failed"].items() if not CATALOG.case(n).unregistered_formats
    }
    assert not broken, broken
    return root
