"""Level c, weights: the engine's effective dense weights equal ctref's bit for bit, or within
the ULP budget where the engine keeps another dtype."""

from conformance import levels


def test_weights(harness, case, record):
    levels.check_weights(harness.load(case), case, record)
