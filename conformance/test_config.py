"""Level a, config: the scheme the engine resolved for each module (or its enum label, checked
against the table in ``conformance/expected/``); a wrong mapping fails, a clear refusal is
not-supported."""

from conformance import levels


def test_config(harness, case, record):
    levels.check_config(harness.backend, harness.load(case), case, record)
