"""Shared test configuration: hypothesis profiles, and one torch thread per xdist worker.

The CI has minutes on two cores, so the default profile ``ci`` runs few examples and no deadline
(a first call into torch can take a second and would otherwise be reported as flaky). Pick another
profile with ``CTREF_HYPOTHESIS_PROFILE=thorough`` (or hypothesis' own ``--hypothesis-profile``).
"""

from __future__ import annotations

import os

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
