"""Level b, inventory: every checkpoint tensor consumed or deliberately ignored, none invented,
no engine parameter silently left at its initial value."""

from conformance import levels


def test_inventory(harness, case, record):
    levels.check_inventory(harness.load(case), case, record)
