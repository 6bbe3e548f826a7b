"""The ``ctref`` entry point: exit codes, bad input, help, progress, certify and generate."""

from __future__ import annotations

import importlib.machinery
import io
import json
import pickle
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from ckpt_helpers import encode, quant_config, write_checkpoint

import ctref.cli
from ctref.cli import main
from ctref.progress import Progress

W4_GROUP = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 16}
COMMANDS = ("inspect", "verify", "dequant")


def tiny_checkpoint(directory: Path) -> Path:
    tensors = encode(
        "model.layers.0.mlp.up_proj", torch.randn(8, 32).bfloat16(), "pack-quantized", W4_GROUP
    )
    tensors["model.norm.weight"] = torch.ones(32, dtype=torch.bfloat16)
    group = {"targets": ["re:.*up_proj$"], "weights": W4_GROUP, "format": "pack-quantized"}
    return write_checkpoint(directory, tensors, quant_config({"g": group}))


def argv(command: str, directory: Path, tmp_path: Path) -> list[str]:
    extra = [str(tmp_path / "out")] if command == "dequant" else []
    return [command, str(directory), *extra]


def one_line_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """Run, expect exit 2 with exactly one line on stderr and no traceback; return the line."""
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.out == ""
    assert "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Bad input


def _not_a_directory(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("x")
    return tmp_path / "file"


def _no_config(tmp_path: Path) -> Path:
    (tmp_path / "c").mkdir()
    return tmp_path / "c"


def _dense_config(tmp_path: Path) -> Path:
    directory = tiny_checkpoint(tmp_path / "c")
    (directory / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    return directory


def _foreign_quant_method(tmp_path: Path) -> Path:
    directory = tiny_checkpoint(tmp_path / "c")
    (directory / "config.json").write_text(
        '{"quantization_config": {"quant_method": "gptq", "bits": 4}}'
    )
    return directory


def _broken_json(tmp_path: Path) -> Path:
    directory = tiny_checkpoint(tmp_path / "c")
    (directory / "config.json").write_text("{not json")
    return directory


def _truncated_shard(tmp_path: Path) -> Path:
    directory = tiny_checkpoint(tmp_path / "c")
    shard = directory / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    return directory


def _garbage_shard(tmp_path: Path) -> Path:
    directory = tiny_checkpoint(tmp_path / "c")
    (directory / "model.safetensors").write_bytes(b"\xff" * 64)
    return directory


def _invalid_scheme(tmp_path: Path) -> Path:
    directory = tiny_checkpoint(tmp_path / "c")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["config_groups"]["g"]["weights"]["strategy"] = "blocky"
    (directory / "config.json").write_text(json.dumps(config))
    return directory


BAD_INPUTS = {
    "missing": (lambda tmp_path: tmp_path / "nothing-here", "does not exist"),
    "file": (_not_a_directory, "not a directory"),
    "no config.json": (_no_config, "no config.json"),
    "broken config.json": (_broken_json, "JSON"),
    "dense config": (_dense_config, "no quantization_config"),
    "gptq config": (_foreign_quant_method, "not compressed-tensors"),
    "truncated shard": (_truncated_shard, "truncated"),
    "garbage shard": (_garbage_shard, "model.safetensors"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, command, case) -> None:
    make, words = BAD_INPUTS[case]
    line = one_line_error(capsys, argv(command, make(tmp_path), tmp_path))
    assert line.startswith(f"ctref {command}: error: ")
    assert words in line


@pytest.mark.parametrize("command", ("inspect", "dequant"))
def test_an_invalid_scheme_is_bad_input_for_inspect_and_dequant(tmp_path, capsys, command) -> None:
    line = one_line_error(capsys, argv(command, _invalid_scheme(tmp_path), tmp_path))
    assert "blocky" in line and "ctref verify" in line


def test_an_invalid_scheme_is_a_finding_for_verify(tmp_path, capsys) -> None:
    code = main(["verify", str(_invalid_scheme(tmp_path)), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1
    (finding,) = report["findings"]
    assert "blocky" in finding["rule"] and finding["file"].endswith("config.json")


@pytest.mark.parametrize("command", COMMANDS)
def test_pickle_only_checkpoint_is_refused_without_unpickling(
    tmp_path, capsys, monkeypatch, command
) -> None:
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"quantization_config": quant_config({})}))
    with (directory / "pytorch_model.bin").open("wb") as handle:
        pickle.dump({"weight": [1.0]}, handle)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("ctref must never unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    line = one_line_error(capsys, argv(command, directory, tmp_path))
    assert "pickle" in line and "safetensors" in line and "pytorch_model.bin" in line


def test_debug_adds_the_traceback(tmp_path, capsys) -> None:
    code = main(["inspect", str(_truncated_shard(tmp_path)), "--debug"])
    err = capsys.readouterr().err
    assert (
        code == 2
        and "Traceback" in err
        and err.rstrip().splitlines()[-1].startswith("ctref inspect: error:")
    )


def test_an_internal_error_is_exit_3_one_line(tmp_path, capsys, monkeypatch) -> None:
    def broken(options: Any) -> int:
        raise RuntimeError("boom")

    monkeypatch.setattr(ctref.cli, "_inspect", broken)
    assert main(["inspect", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "boom" in err and "--debug" in err


def test_console_entry_point_runs_in_a_fresh_process(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ctref.cli", "verify", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr
    good = tiny_checkpoint(tmp_path / "good")
    result = subprocess.run(
        [sys.executable, "-m", "ctref.cli", "verify", str(good)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# Usage and help


def test_usage_errors_exit_2(capsys) -> None:
    assert main([]) == 2
    assert main(["verify"]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["dequant", "a", "b", "--dtype", "int3"]) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, words",
    [
        ("inspect", ["headers", "scheme", "format", "--all"]),
        ("verify", ["Exit 0", "index", "g_idx", "--structure-only", "--device"]),
        ("dequant", ["--dtype", "keep", "quantization_config", "OUT"]),
        ("certify", ["--backend", "--report-dir", "pytest"]),
    ],
)
def test_help_explains_each_command(capsys, command, words) -> None:
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    for word in [*words, "--json", "--quiet", "--debug"]:
        assert word in text, word


def test_top_level_help_lists_commands_and_exit_codes(capsys) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for word in ("inspect", "verify", "dequant", "certify", "generate", "exit codes"):
        assert word in text


def test_device_cuda_without_cuda_is_bad_input(tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    line = one_line_error(
        capsys, ["verify", str(tiny_checkpoint(tmp_path / "c")), "--device", "cuda"]
    )
    assert "CUDA is not available" in line


# ---------------------------------------------------------------------------------------------
# Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_and_summarizes_everywhere(monkeypatch) -> None:
    monkeypatch.setattr("ctref.progress.REDRAW_SECONDS", 0.0)
    terminal = FakeTerminal()
    progress = Progress("dequant", 4, 4096, stream=terminal)
    progress.advance(1, 1024)
    progress.advance(1, 1024)
    progress.finish("done")
    assert "\r" in terminal.getvalue() and "2/4 modules" in terminal.getvalue()
    assert "[" + "#" * 12 + "." * 12 + "]" in terminal.getvalue()
    assert terminal.getvalue().endswith("done in 0.0 s\n")

    for stream, quiet in ((io.StringIO(), False), (FakeTerminal(), True)):
        progress = Progress("dequant", 4, 4096, stream=stream, quiet=quiet)
        progress.advance(2, 2048)
        progress.finish("done")
        assert stream.getvalue() == "done in 0.0 s\n"


def test_commands_print_only_the_summary_when_stderr_is_not_a_terminal(tmp_path, capsys) -> None:
    directory = tiny_checkpoint(tmp_path / "c")
    assert main(["dequant", str(directory), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ctref dequant: 1 modules dequantized")


def test_dequant_json(tmp_path, capsys) -> None:
    directory = tiny_checkpoint(tmp_path / "c")
    assert main(["dequant", str(directory), str(tmp_path / "out"), "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["modules_dequantized"], report["tensors"], report["files"]) == (1, 2, 1)
    assert report["bytes_written"] == (tmp_path / "out" / "model.safetensors").stat().st_size


# ---------------------------------------------------------------------------------------------
# certify and generate

FAKE_SUITE_CONFTEST = """
def pytest_addoption(parser):
    parser.addoption("--backend", required=True)
    parser.addoption("--report-dir", required=True)
"""
FAKE_SUITE_TEST = """
import json, pathlib

def test_backend(request):
    # Passes unless the backend is "failing"; the report says conformant only for "good"
    # ("incomplete" stands for a must-pass case that never ran, in the real suite).
    backend = request.config.getoption("--backend")
    report = pathlib.Path(request.config.getoption("--report-dir"))
    report.mkdir(parents=True, exist_ok=True)
    verdict = {"backend": backend, "conformant": backend == "good"}
    (report / "results.json").write_text(json.dumps(verdict))
    assert backend != "failing"
"""


def _fake_suite(tmp_path: Path) -> Path:
    suite = tmp_path / "conformance"
    suite.mkdir()
    (suite / "conftest.py").write_text(FAKE_SUITE_CONFTEST)
    (suite / "test_fake.py").write_text(FAKE_SUITE_TEST)
    return suite


@pytest.mark.parametrize("backend, expected", [("good", 0), ("failing", 1), ("incomplete", 1)])
def test_certify_exits_with_the_suites_verdict(tmp_path, capsys, backend, expected) -> None:
    suite = _fake_suite(tmp_path)
    report = tmp_path / "report"
    args = ["--backend", backend, "--suite", str(suite), "--report-dir", str(report)]
    code = main(["certify", *args, "--json", "-q"])
    assert code == expected
    result = json.loads(capsys.readouterr().out)
    assert result["backend"] == backend and result["conformant"] == (expected == 0)
    assert result["pytest_exit_code"] == (1 if backend == "failing" else 0)
    assert json.loads((report / "results.json").read_text())["backend"] == backend


def test_certify_passes_extra_arguments_to_pytest(tmp_path, capsys) -> None:
    suite = _fake_suite(tmp_path)
    args = ["--backend", "good", "--suite", str(suite), "--report-dir", str(tmp_path / "r")]
    assert main(["certify", *args, "--json", "--", "-k", "no_such_test"]) == 2
    result = json.loads(capsys.readouterr().out)
    assert result["pytest_exit_code"] == 5 and result["command"][-2:] == ["-k", "no_such_test"]


def test_certify_without_a_suite_is_bad_input(tmp_path, capsys) -> None:
    line = one_line_error(capsys, ["certify", "--backend", "x", "--suite", str(tmp_path / "none")])
    assert "no conformance suite" in line


def test_generate_delegates_the_remaining_arguments(monkeypatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("ctref.fixtures.generate")
    fake.__spec__ = importlib.machinery.ModuleSpec("ctref.fixtures.generate", None)
    fake.main = lambda args: seen.append(args) or 0
    monkeypatch.setitem(sys.modules, "ctref.fixtures.generate", fake)
    assert main(["generate", "--out", "x", "--help-me"]) == 0
    assert seen == [["--out", "x", "--help-me"]]


def test_generate_usage_errors_are_returned_not_raised(monkeypatch) -> None:
    def usage_error(args: list[str]) -> int:
        raise SystemExit(2)

    fake = types.ModuleType("ctref.fixtures.generate")
    fake.__spec__ = importlib.machinery.ModuleSpec("ctref.fixtures.generate", None)
    fake.main = usage_error
    monkeypatch.setitem(sys.modules, "ctref.fixtures.generate", fake)
    assert main(["generate", "--bogus"]) == 2


def test_generate_without_a_generator_is_bad_input(capsys, monkeypatch) -> None:
    monkeypatch.setattr(ctref.cli.importlib.util, "find_spec", lambda name: None)
    line = one_line_error(capsys, ["generate"])
    assert "fixture generator" in line
