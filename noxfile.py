"""How everything in ctref is run: ``nox -s <session>``.

Sessions build their own virtual environment with the CPU build of torch pinned in
``constraints/cpu.txt``. Inside an environment that already has its own torch (an engine
container), install ctref there (``pip install -e .[test]``) and run ``nox --no-venv --no-install -s
<session>``: nothing is installed or pinned then, and the torch there is kept.
"""

from __future__ import annotations

import os
import subprocess

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
CONSTRAINTS = "constraints/cpu.txt"
LEGACY_PEER = "compressed-tensors==0.14.0.1"
GPU_BACKENDS = ("torch-kernels", "transformers")


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


def gpu_count() -> int:
    """GPUs on this host as ``nvidia-smi -L`` lists them (0 without a driver)."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())


@nox.session(python=PYTHON)
def gpu(session: nox.Session) -> None:
    """The GPU suite: the gpu-marked tests, then the conformance suite on CUDA for each GPU
    backend, reports in ``reports/gpu/<backend>/``. Needs a CUDA build of torch: where one is
    installed, ``pip install -e .[test,peer]`` and run ``nox --no-venv --no-install -s gpu``
    (nox refuses ``session.install`` without a virtualenv otherwise). One
    pytest-xdist worker per GPU (CTREF_WORKERS overrides), each pinned to its own device by
    ``conformance.arch``. Arguments go to every pytest run."""
    gpus = gpu_count()
    if gpus == 0:
        session.error("nvidia-smi lists no GPU: the GPU suite needs one")
    install(session, "-e", ".[test,peer]")
    count = os.environ.get("CTREF_WORKERS", str(gpus))
    session.run("pytest", "-p", "conformance.arch", "tests", "-m", "gpu", "-n", count, *session.posargs)
    for backend in GPU_BACKENDS:
        session.run(
            "pytest", "conformance", "--backend", backend, "--device", "cuda", "-n", count,
            "--report-dir", f"reports/gpu/{backend}", *session.posargs,
        )
