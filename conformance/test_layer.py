"""Level d, layer: the engine's kernel output for fixed inputs and one-hot probes against the
reference layer output, within the tolerance policy (ctref/tolerances.toml)."""

from conformance import levels


def test_layer(harness, case, record):
    levels.check_layer(harness.load(case), case, record)
