"""ctref's conformance suite: an engine, through a backend adapter, against the reference."""

__version__ = "0.1.0"
