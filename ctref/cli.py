"""The ``ctref`` command: inspect, verify, dequantize and certify compressed-tensors checkpoints.

Exit codes: 0 success (``verify``: no errors), 1 findings (``verify`` errors, ``certify``: not
conformant), 2 usage or bad input (one line on stderr says what is wrong and what to do; ``--debug``
adds the traceback), 3 an internal error of ctref.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ctref import __version__
from ctref.checkpoint import Checkpoint, ModuleInfo, open_checkpoint
from ctref.config import QUANT_METHODS, QuantArgs
from ctref.errors import CTRefError
from ctref.headers import ShardHeader, read_header
from ctref.progress import Progress, human_bytes

__all__ = ["main"]

EXIT_OK, EXIT_FINDINGS, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3

DTYPES: dict[str, torch.dtype | None] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "keep": None,
}

REPO_ROOT = Path(__file__).resolve().parent.parent


class BadInput(Exception):
    """Input ctref cannot work on; the message says what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``ctref`` command; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["generate"]:
        return _guarded(lambda: _generate(args[1:]), "generate", debug="--debug" in args)
    parser = _parser()
    try:
        options = parser.parse_args(args)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed
        return int(exit_.code or 0)
    if options.command is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    return _guarded(lambda: options.run(options), options.command, debug=options.debug)


def _guarded(run: Callable[[], int], command: str, *, debug: bool) -> int:
    """Run a command; turn bad input into one line on stderr (and a traceback with --debug)."""
    try:
        return run()
    except (BadInput, CTRefError) as error:
        if debug:
            traceback.print_exc()
        print(f"ctref {command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"ctref {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        if debug:
            traceback.print_exc()
        print(
            f"ctref {command}: internal error: {type(error).__name__}: {error} "
            "(rerun with --debug for the traceback, and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


# ---------------------------------------------------------------------------------------------
# Arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctref",
        description="Inspect, verify, dequantize and certify compressed-tensors checkpoints "
        "(safetensors directories whose config.json has a compressed-tensors "
        "quantization_config).",
        epilog="exit codes: 0 success, 1 findings (verify) or not conformant (certify), 2 usage or "
        "bad input, 3 internal error. 'ctref COMMAND --help' explains each command; "
        "docs/cli.md has examples.",
    )
    parser.add_argument("--version", action="version", version=f"ctref {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    common.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar (the summary line remains)"
    )
    common.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, summary: str, description: str, run: Callable[..., int]):
        sub = commands.add_parser(
            name,
            parents=[common],
            help=summary,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(run=run)
        return sub

    inspect = command(
        "inspect",
        "what a checkpoint holds, from its headers only (seconds on any size)",
        "List every weight-bearing module with its config group (scheme), compression format,\n"
        "strategy, bits and stored tensors (numbered layers folded into one row), then modules,\n"
        "tensors and bytes per format, and flag tensors that are unknown or unused. Reads\n"
        "config.json and the safetensors headers (plus each packed module's 2-3 entry\n"
        "weight_shape); no weight data.\n\n"
        "  ctref inspect ./Llama-3-8B-W4A16\n"
        "  ctref inspect ./ckpt --all          # one row per module\n"
        "  ctref inspect ./ckpt --json | jq '.formats'",
        _inspect,
    )
    inspect.add_argument("directory", help="checkpoint directory (config.json + *.safetensors)")
    inspect.add_argument("--all", action="store_true", help="one row per module, no folding")

    verify = command(
        "verify",
        "lint a checkpoint: structure from headers, then every value, module by module",
        "Structural checks from the headers: every tensor a module's format needs is present\n"
        "with the right dtype and shape, the activation/KV-cache parameters its scheme needs\n"
        "are present, nothing is left over, and the index agrees with the shards. Numeric\n"
        "checks stream over the data one module at a time: each module is decoded by its format\n"
        "(which checks codes, scales, g_idx), then scales must be positive, zero points in range,\n"
        "g_idx a valid group assignment, dense weights and biases free of NaN/Inf. All findings\n"
        "are collected, each naming file, tensor and rule. Exit 0 when there is no error\n"
        "(warnings alone do not fail), 1 with errors.\n\n"
        "  ctref verify ./ckpt\n"
        "  ctref verify ./ckpt --structure-only     # headers and activation scales only\n"
        "  ctref verify ./ckpt --device cuda --json > report.json",
        _verify,
    )
    verify.add_argument("directory", help="checkpoint directory")
    verify.add_argument(
        "--structure-only",
        action="store_true",
        help="skip the numeric pass over the weights",
    )
    verify.add_argument("--device", default="cpu", help="decode on this device (cpu, cuda)")

    dequant = command(
        "dequant",
        "write the dense Hugging Face checkpoint, one module at a time",
        "Decode every quantized module and write a dense checkpoint: the same shard names and\n"
        "index, each quantized module's storage replaced by one '<module>.weight', activation\n"
        "and KV-cache parameters dropped, everything else copied byte for byte; config.json\n"
        "without quantization_config; tokenizer and other small files copied. Memory stays at\n"
        "a few modules whatever the shard size. OUT must be new or empty.\n\n"
        "  ctref dequant ./Llama-3-8B-W4A16 ./Llama-3-8B-dense\n"
        "  ctref dequant ./ckpt ./dense --dtype keep --device cuda",
        _dequant,
    )
    dequant.add_argument("directory", help="compressed checkpoint directory")
    dequant.add_argument("out", help="output directory (created; must be empty if it exists)")
    dequant.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="bf16",
        help="dtype of the dequantized weights (default bf16; keep = each format's own: the "
        "scale dtype for int/fp8, bf16 for NVFP4/MX). Unquantized tensors are copied as stored",
    )
    dequant.add_argument("--device", default="cpu", help="decode on this device (cpu, cuda)")

    certify = command(
        "certify",
        "run the conformance suite against an engine backend and write its report folder",
        "Run 'pytest conformance --backend NAME --report-dir DIR' (the conformance suite's own\n"
        "options) and exit with its verdict: 0 conformant, 1 not conformant (failures, or a\n"
        "must-pass case that did not run), 2 the suite could not run. Arguments after '--' go\n"
        "to pytest unchanged (the suite's --device, --cases, --expectations; -n 2).\n\n"
        "  ctref certify --backend ctref\n"
        "  ctref certify --backend vllm --report-dir reports/vllm -- -x -k nvfp4",
        _certify,
    )
    certify.add_argument("--backend", required=True, help="backend adapter name")
    certify.add_argument(
        "--report-dir", help="report folder (default: reports/certify-<backend> here)"
    )
    certify.add_argument(
        "--suite", help="conformance suite directory (default: the one beside this ctref)"
    )
    certify.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after '--'")

    commands.add_parser(
        "generate",
        help="write fixture checkpoints (ctref generate --help for its options)",
        add_help=False,
    )
    return parser


# ---------------------------------------------------------------------------------------------
# Reading the input


def _load_shards(path: str) -> tuple[Path, dict[str, ShardHeader]]:
    """Refuse what is not a compressed-tensors safetensors checkpoint; read every shard header.

    These are bad input for every command (exit 2): a missing directory, no or unreadable
    config.json, no quantization section, pickle-only weights (never unpickled), a shard whose
    header cannot be read.
    """
    directory = Path(path)
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise BadInput(f"{path} {what}; pass a checkpoint directory (config.json + *.safetensors)")
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(
            f"{path} has no config.json, so it is not a Hugging Face checkpoint directory; "
            "pass the directory that holds config.json and the *.safetensors shards"
        ) from None
    except (OSError, ValueError) as error:
        raise BadInput(
            f"{config_path}: cannot be read as JSON ({error}); fix or re-download it"
        ) from None
    section = _quantization_section(config)
    if section is None:
        raise BadInput(
            f"{config_path} has no quantization_config: this is not a compressed checkpoint; "
            "a dense checkpoint needs no ctref (load it as it is)"
        )
    method = section.get("quant_method") if isinstance(section, Mapping) else None
    if method is not None and method not in QUANT_METHODS:
        raise BadInput(
            f"{config_path}: quant_method is {method!r}, not compressed-tensors; ctref reads "
            "only compressed-tensors checkpoints (convert it with compressed-tensors' converters)"
        )
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in directory.glob("*.bin"))
        if pickles:
            raise BadInput(
                f"{path} holds only PyTorch pickle weights ({pickles[0]}); ctref never unpickles "
                "(it could run arbitrary code): convert the weights to safetensors first"
            )
        raise BadInput(f"{path} has no *.safetensors files; pass a safetensors checkpoint")
    return directory, {file.name: read_header(file) for file in files}


def _quantization_section(config: Any) -> Any:
    """Where 0.20.0 looks for the section (§1.1), or None."""
    if not isinstance(config, Mapping):
        return None
    text_config = config.get("text_config")
    for candidate in (
        config.get("quantization_config"),
        text_config.get("quantization_config") if isinstance(text_config, Mapping) else None,
        config.get("compression_config"),
    ):
        if candidate is not None:
            return candidate
    return None


def _open(directory: Path) -> Checkpoint:
    """Open for inspect and dequant: a checkpoint the reader refuses is bad input."""
    try:
        return open_checkpoint(directory)
    except CTRefError as error:
        raise BadInput(f"{error} (ctref verify {directory} lists every problem)") from error


def _checkpoint_shards(
    checkpoint: Checkpoint, shards: Mapping[str, ShardHeader], names: Iterable[str]
) -> dict[str, ShardHeader]:
    """The shards that make up the checkpoint (an index may leave stray files out)."""
    files = {checkpoint.header(name).file for name in names}
    return {file: header for file, header in shards.items() if file in files}


def _device(name: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {name}: CUDA is not available here; use --device cpu")
    try:
        torch.device(name)
    except RuntimeError:
        raise BadInput(f"--device {name!r} is not a torch device; use cpu or cuda") from None
    return name


# ---------------------------------------------------------------------------------------------
# inspect


def _inspect(options: argparse.Namespace) -> int:
    directory, all_shards = _load_shards(options.directory)
    with _open(directory) as checkpoint:
        report = _inspection(checkpoint, all_shards)
    if options.json:
        print(json.dumps(report, indent=2))
    else:
        print(_render_inspection(report, fold=not options.all))
    return EXIT_OK


def _inspection(checkpoint: Checkpoint, all_shards: Mapping[str, ShardHeader]) -> dict[str, Any]:
    """Everything ``inspect`` reports, from the config and the headers."""
    from ctref.verify import account, module_tensors, resolve_modules

    names = checkpoint.tensor_names()
    shards = _checkpoint_shards(checkpoint, all_shards, names)
    sizes = {name: entry.nbytes for h in shards.values() for name, entry in h.tensors.items()}
    infos, errors = resolve_modules(checkpoint, names)
    accounting = account(checkpoint, infos, names)
    modules, formats = [], {}
    for info in infos:
        record = _module_record(checkpoint, info)
        record["tensors"] = [
            {**_tensor_record(checkpoint, name, sizes[name]), "role": accounting.role(name)}
            for name in module_tensors(info).values()
        ]
        modules.append(record)
        row = formats.setdefault(info.format, {"modules": 0, "tensors": 0, "bytes": 0})
        row["modules"] += 1
        row["tensors"] += len(info.tensor_names)
        row["bytes"] += sum(sizes[name] for name in info.tensor_names)
    in_modules = {name for info in infos for name in info.tensor_names}
    outside = [name for name in names if name not in in_modules]
    flagged = [
        {"tensor": name, "file": checkpoint.header(name).file, "flag": "unused", "why": why}
        for name, why in accounting.unused.items()
    ] + [
        {
            "tensor": name,
            "file": checkpoint.header(name).file,
            "flag": "unknown",
            "why": "not part of any module's weight, bias or quantization",
        }
        for name in sorted(accounting.unknown)
    ]
    config = checkpoint.config
    return {
        "checkpoint": str(checkpoint.directory),
        "quantization_config": {
            "version": config.version,
            "format": config.format,
            "quantization_status": config.quantization_status,
            "config_groups": list(config.config_groups),
            "kv_cache_scheme": _args_record(config.kv_cache_scheme),
        },
        "files": [
            {"file": file, "tensors": len(h.tensors), "bytes": h.data_bytes}
            for file, h in shards.items()
        ],
        "modules": modules,
        "formats": formats,
        "outside_modules": {"tensors": len(outside), "bytes": sum(sizes[n] for n in outside)},
        "flagged": flagged,
        "errors": [
            {"file": e.file, "tensor": e.tensor, "rule": e.rule}
            for e in [*errors, *accounting.errors]
        ],
    }


def _module_record(checkpoint: Checkpoint, info: ModuleInfo) -> dict[str, Any]:
    scheme = info.scheme
    weights = scheme.weights if scheme is not None else None
    record: dict[str, Any] = {
        "name": info.name,
        "scheme": info.group,
        "format": info.format,
        "sparsity_format": info.sparsity_format,
        "weight_shape": list(info.weight_shape),
        "weights": _args_record(weights),
        "input_activations": _args_record(scheme.input_activations if scheme else None),
        "output_activations": _args_record(scheme.output_activations if scheme else None),
        "file": info.file,
    }
    if weights is None and f"{info.name}.weight" in info.tensor_names:
        record["stored_dtype"] = checkpoint.header(f"{info.name}.weight").describe_dtype()
    return record


def _tensor_record(checkpoint: Checkpoint, name: str, nbytes: int) -> dict[str, Any]:
    header = checkpoint.header(name)
    return {
        "name": name,
        "dtype": header.describe_dtype(),
        "shape": list(header.shape),
        "bytes": nbytes,
        "file": header.file,
    }


def _args_record(args: QuantArgs | None) -> dict[str, Any] | None:
    return None if args is None else args.to_dict()


def _strategy_text(args: dict[str, Any] | None) -> str:
    if args is None:
        return "-"
    strategy = args.get("strategy") or "-"
    if strategy in ("group", "tensor_group"):
        return f"{strategy} {args.get('group_size')}"
    if strategy == "block":
        rows, cols = args.get("block_structure")
        return f"block {rows}x{cols}"
    return strategy


def _bits_text(args: dict[str, Any] | None) -> str:
    if args is None:
        return "-"
    kind = "int" if args.get("type", "int") == "int" else "fp"
    text = f"{kind}{args.get('num_bits', 8)}"
    return text if args.get("symmetric", True) else text + " asym"


def _activation_text(args: dict[str, Any] | None) -> str:
    if args is None:
        return "-"
    dynamic = args.get("dynamic", False)
    mode = {True: "dynamic", "local": "local", False: "static"}.get(dynamic, str(dynamic))
    return f"{_bits_text(args)} {_strategy_text(args)} {mode}"


def _fold(name: str) -> str:
    """``model.layers.7.mlp.experts.3.up_proj`` → ``model.layers.*.mlp.experts.*.up_proj``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _render_inspection(report: Mapping[str, Any], *, fold: bool) -> str:
    qc = report["quantization_config"]
    files = report["files"]
    lines = [
        f"checkpoint  {report['checkpoint']}",
        f"config      compressed-tensors {qc['version'] or '(no version)'}, format "
        f"{qc['format']}, status {qc['quantization_status']}, groups "
        f"{', '.join(qc['config_groups']) or '-'}"
        + (
            f", kv cache {_activation_text(qc['kv_cache_scheme'])}" if qc["kv_cache_scheme"] else ""
        ),
        f"files       {len(files)} shard{'s' if len(files) != 1 else ''}, "
        f"{sum(f['tensors'] for f in files)} tensors, "
        f"{human_bytes(sum(f['bytes'] for f in files))}",
        "",
    ]
    rows: dict[tuple[str, ...], int] = {}
    for module in report["modules"]:
        weights = module["weights"]
        key = (
            _fold(module["name"]) if fold else module["name"],
            module["scheme"] or "-",
            module["format"]
            + (f"+{module['sparsity_format']}" if module["sparsity_format"] else ""),
            _strategy_text(weights),
            _bits_text(weights) if weights else (module.get("stored_dtype") or "-"),
            _activation_text(module["input_activations"]),
            ",".join(sorted(t["name"].rpartition(".")[2] for t in module["tensors"])),
        )
        rows[key] = rows.get(key, 0) + 1
    header = ("MODULE", "N", "SCHEME", "FORMAT", "STRATEGY", "BITS", "INPUT", "TENSORS")
    table = [header] + [(key[0], str(count), *key[1:]) for key, count in rows.items()]
    lines += _table(table)
    lines.append("")
    format_rows = [("FORMAT", "MODULES", "TENSORS", "BYTES")]
    for name, row in sorted(report["formats"].items()):
        format_rows.append(
            (name, str(row["modules"]), str(row["tensors"]), human_bytes(row["bytes"]))
        )
    outside = report["outside_modules"]
    if outside["tensors"]:
        format_rows.append(
            ("(outside modules)", "-", str(outside["tensors"]), human_bytes(outside["bytes"]))
        )
    lines += _table(format_rows, right=(1, 2, 3))
    if report["flagged"]:
        lines += ["", f"flagged tensors ({len(report['flagged'])}):"]
        lines += [
            f"  {f['flag']:<8} {f['file']}: {f['tensor']}: {f['why']}" for f in report["flagged"]
        ]
    if report["errors"]:
        lines += ["", f"modules the reader cannot resolve ({len(report['errors'])}):"]
        lines += [
            "  " + ": ".join(part for part in (e["file"], e["tensor"], e["rule"]) if part)
            for e in report["errors"]
        ]
    return "\n".join(lines)


def _table(rows: Sequence[Sequence[str]], right: Iterable[int] = (1,)) -> list[str]:
    right = set(right)
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(width) if col in right else cell.ljust(width)
            for col, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


# ---------------------------------------------------------------------------------------------
# verify


def _verify(options: argparse.Namespace) -> int:
    from ctref.verify import Finding, index_findings, resolve_modules, verify_checkpoint

    directory, all_shards = _load_shards(options.directory)
    device = _device(options.device)
    progress = Progress("verify", quiet=options.quiet or options.structure_only)
    try:
        checkpoint = open_checkpoint(directory)
    except CTRefError as error:
        findings = index_findings(directory, all_shards) or [Finding.from_error("open", error)]
    else:
        with checkpoint:
            names = checkpoint.tensor_names()
            shards = _checkpoint_shards(checkpoint, all_shards, names)
            sizes = {n: e.nbytes for h in shards.values() for n, e in h.tensors.items()}
            infos, _ = resolve_modules(checkpoint, names)
            progress.set_totals(len(infos), sum(sizes[n] for i in infos for n in i.tensor_names))
            findings = verify_checkpoint(
                checkpoint,
                numeric=not options.structure_only,
                device=device,
                on_module=lambda info: progress.advance(
                    1, sum(sizes[name] for name in info.tensor_names)
                ),
            )
    errors = sum(1 for f in findings if f.severity == "error")
    warnings = len(findings) - errors
    if options.json:
        report = {
            "checkpoint": str(directory),
            "clean": not errors,
            "errors": errors,
            "warnings": warnings,
            "modules": progress.total_items,
            "numeric": not options.structure_only,
            "findings": [f.to_dict() for f in findings],
        }
        print(json.dumps(report, indent=2))
    else:
        for finding in findings:
            print(finding)
    verdict = f"{errors} error{'s' * (errors != 1)}" if errors else "clean"
    checked = "structure only" if options.structure_only else "structure and values"
    progress.finish(
        f"ctref verify: {verdict}, {warnings} warning{'s' * (warnings != 1)}, "
        f"{progress.total_items} modules ({checked})"
    )
    return EXIT_FINDINGS if errors else EXIT_OK


# ---------------------------------------------------------------------------------------------
# dequant


def _dequant(options: argparse.Namespace) -> int:
    from ctref.dequant import dequantize_checkpoint

    directory, all_shards = _load_shards(options.directory)
    out = Path(options.out)
    if out.resolve() == directory.resolve():
        raise BadInput("OUT is the input directory; write the dense checkpoint somewhere new")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out} exists and is not an empty directory; choose a new OUT")
    device = _device(options.device)
    progress = Progress("dequant", quiet=options.quiet)
    with _open(directory) as checkpoint:
        shards = _checkpoint_shards(checkpoint, all_shards, checkpoint.tensor_names())
        try:
            summary = dequantize_checkpoint(
                checkpoint,
                shards,
                out,
                dtype=DTYPES[options.dtype],
                device=device,
                progress=progress,
            )
        except CTRefError as error:
            raise BadInput(
                f"{error}; no shard was kept (ctref verify {directory} lists every problem)"
            ) from error
    if options.json:
        report = {
            "output": str(summary.output),
            "modules_dequantized": summary.modules,
            "tensors": summary.tensors,
            "files": summary.files,
            "bytes_written": summary.bytes_written,
            "dtype": options.dtype,
            "skipped_files": list(summary.skipped_files),
            "seconds": round(progress.elapsed, 3),
        }
        print(json.dumps(report, indent=2))
    skipped = f"; not copied: {', '.join(summary.skipped_files)}" if summary.skipped_files else ""
    progress.finish(
        f"ctref dequant: {summary.modules} modules dequantized, {summary.tensors} tensors in "
        f"{summary.files} file{'s' * (summary.files != 1)} ({human_bytes(summary.bytes_written)}) "
        f"-> {out}{skipped}"
    )
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# certify and generate


def _certify(options: argparse.Namespace) -> int:
    suite = Path(options.suite) if options.suite else REPO_ROOT / "conformance"
    if not suite.is_dir():
        raise BadInput(
            f"no conformance suite at {suite}; run from a ctref checkout or pass --suite PATH"
        )
    report_dir = Path(
        options.report_dir or Path("reports") / f"certify-{options.backend}"
    ).resolve()
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(suite.resolve()),
        "--backend",
        options.backend,
        "--report-dir",
        str(report_dir),
        *(["-q"] if options.quiet else []),
        *options.pytest_args,
    ]
    started = time.time()
    returncode = _run_pytest(command, suite.resolve().parent, to_stderr=options.json)
    conformant = _reported_verdict(report_dir / "results.json", since=started)
    if returncode not in (0, 1):
        verdict = EXIT_BAD_INPUT
    elif conformant is not None:
        verdict = EXIT_OK if conformant else EXIT_FINDINGS
    else:
        verdict = EXIT_OK if returncode == 0 else EXIT_FINDINGS
    if options.json:
        report = {
            "backend": options.backend,
            "report_dir": str(report_dir),
            "pytest_exit_code": returncode,
            "conformant": verdict == EXIT_OK,
            "command": command,
        }
        print(json.dumps(report, indent=2))
    words = {EXIT_OK: "conformant", EXIT_FINDINGS: "NOT conformant"}.get(
        verdict, "the suite could not run"
    )
    print(
        f"ctref certify: backend {options.backend}: {words} (pytest exit {returncode}); "
        f"report in {report_dir}",
        file=sys.stderr,
    )
    return verdict


def _reported_verdict(results: Path, *, since: float) -> bool | None:
    """The suite's own verdict (``conformant`` in the ``results.json`` this run wrote): failing
    tests are not its only reason to refuse (a must-pass case that never ran is another)."""
    try:
        if results.stat().st_mtime < since:
            return None
        verdict = json.loads(results.read_text(encoding="utf-8")).get("conformant")
    except (OSError, ValueError, AttributeError):
        return None
    return verdict if isinstance(verdict, bool) else None


def _run_pytest(command: list[str], cwd: Path, *, to_stderr: bool) -> int:
    """pytest's own output is the progress; with --json it goes to stderr, line by line, so that
    stdout holds only the JSON."""
    if not to_stderr:
        return subprocess.run(command, cwd=cwd, check=False).returncode
    with subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, text=True) as child:
        for line in child.stdout:
            sys.stderr.write(line)
    return child.returncode


def _generate(args: list[str]) -> int:
    """Hand the arguments to ``ctref.fixtures.generate.main`` (imported only when asked for)."""
    try:
        found = importlib.util.find_spec("ctref.fixtures.generate") is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise BadInput(
            "this ctref has no fixture generator (ctref.fixtures.generate); update ctref"
        )
    generate = importlib.import_module("ctref.fixtures.generate")
    try:
        return int(generate.main(args) or 0)
    except SystemExit as exit_:  # its own argparse: --help (0) or a usage error (2)
        return int(exit_.code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
