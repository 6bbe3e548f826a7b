"""Level e, model: logits of the model-level fixtures against the reference model built from
ctref's weights."""

from conformance import levels


def test_model(harness, case, record):
    levels.check_model(harness.load(case), case, record)
