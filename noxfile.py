"""How everything in ctref is run: ``nox -s <session>``.

Sessions build their own virtual environment with the CPU build of torch pinned in
``constraints/cpu.txt``. Inside an environment that already has its own torch (an engine
container), run ``nox --no-venv -s <session>``: nothing is pinned then, and the torch there is kept.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
CONSTRAINTS = "constraints/cpu.txt"
LEGACY_PEER = "compressed-tensors==0.14.0.1"


def install(session: nox.Session, *args: str) -> None:
    """pip install ``args``, pinning the CPU torch unless running in an existing environment."""
    pinned = session.venv_backend != "none" and not os.environ.get("CTREF_KEEP_TORCH")
    session.install(*(["-c", CONSTRAINTS] if pinned else []), *args)


def workers() -> str:
    return os.environ.get("CTREF_WORKERS", "auto")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The project's own tests, the peer cross-checks against compressed-tensors 0.20 included."""
    install(session, "-e", ".[test,peer]")
    session.run(
        "pytest", "tests", "-n", workers(), "-m", "not slow and not gpu and not peer_legacy",
        *session.posargs,
    )


@nox.session(name="peer-legacy", python=PYTHON)
def peer_legacy(session: nox.Session) -> None:
    """Cross-checks of the legacy formats (sparse, marlin-24, act-order) against 0.14.0.1."""
    # 0.14.0.1 imports psutil without declaring it.
    install(session, "-e", ".[test]", LEGACY_PEER, "transformers", "psutil")
    session.run("pytest", "tests/legacy", "-n", workers(), "-m", "peer_legacy", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Decode speed of ctref against compressed-tensors, same run, same tensors."""
    install(session, "-e", ".[peer]")
    session.run("python", "benchmarks/bench_decode.py", *session.posargs)


@nox.session(name="bench-dequant", python=PYTHON)
def bench_dequant(session: nox.Session) -> None:
    """ctref dequant against compressed-tensors' convert_checkpoint on a ≥1 GB checkpoint."""
    install(session, "-e", ".[peer]")
    session.run("python", "benchmarks/bench_dequant.py", *session.posargs)


@nox.session(python=PYTHON)
def fixtures(session: nox.Session) -> None:
    """Generate the fixture catalog into .fixtures-cache/ (arguments go to the generator)."""
    install(session, "-e", ".")
    session.run("python", "-m", "ctref.fixtures.generate", "--jobs", "2", *session.posargs)


def conformance_backend(posargs: list[str]) -> str:
    """The backend a conformance run selects: ``--backend NAME`` in posargs, else $CTREF_BACKEND,
    else ``reference`` (the suite's own rule, conformance/backends/__init__.py)."""
    for index, arg in enumerate(posargs):
        if arg == "--backend" and index + 1 < len(posargs):
            return posargs[index + 1]
        if arg.startswith("--backend="):
            return arg.partition("=")[2]
    return os.environ.get("CTREF_BACKEND", "reference")


@nox.session(python=PYTHON)
def conformance(session: nox.Session) -> None:
    """The conformance suite against one engine: ``nox -s conformance -- --backend NAME``."""
    install(session, "-e", ".[test,peer]")
    session.run("pytest", "conformance", "-n", workers(), *session.posargs)


@nox.session(python=PYTHON)
def certify(session: nox.Session) -> None:
    """A certification run: junit.xml, results.json and certificate.md in reports/<backend>/."""
    install(session, "-e", ".[test,peer]")
    backend = conformance_backend(session.posargs)
    session.run(
        "pytest", "conformance", "-n", workers(), "--report-dir", f"reports/{backend}",
        *session.posargs,
    )
