"""Decode speed of ctref against compressed-tensors 0.20, same tensors, same run.

Prints, per format: the library's ``decompress`` time, ctref's decode time, their ratio, whether
the bits are identical, and the time and bandwidth of a plain copy of the output (the memory
bound). On CUDA it also prints ctref's share of the measured copy bandwidth.

    python benchmarks/bench_decode.py                      # CPU, 4096 x 4096
    python benchmarks/bench_decode.py --device cuda --size 16384
    python benchmarks/bench_decode.py --json results.json

Figures are medians over ``--repeat`` runs after warm-up (ctref's warm-up includes compiling its
fused kernel, which happens once per process and shape).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from ctref.config import QuantArgs
from ctref.formats import format_names, get_format

CASES = {
    "W4A16 g128 (pack-quantized)": (
        "pack-quantized",
        {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128},
    ),
    "W8A8 int8 channel (int-quantized)": (
        "int-quantized",
        {"num_bits": 8, "type": "int", "strategy": "channel"},
    ),
    "FP8 block 128x128 (float-quantized)": (
        "float-quantized",
        {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]},
    ),
    "NVFP4 (nvfp4-pack-quantized)": (
        "nvfp4-pack-quantized",
        {
            "num_bits": 4,
            "type": "float",
            "strategy": "tensor_group",
            "group_size": 16,
            "scale_dtype": "torch.float8_e4m3fn",
            "zp_dtype": "torch.float8_e4m3fn",
        },
    ),
    "MXFP4 (mxfp4-pack-quantized)": (
        "mxfp4-pack-quantized",
        {
            "num_bits": 4,
            "type": "float",
            "strategy": "group",
            "group_size": 32,
            "scale_dtype": "torch.uint8",
            "zp_dtype": "torch.uint8",
        },
    ),
}


def timed(fn: Callable[[], torch.Tensor], repeat: int, device: str) -> tuple[float, torch.Tensor]:
    """Median wall time (ms) of ``fn`` after two warm-up calls, and its last result."""
    result = fn()
    result = fn()
    samples = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), result


def kernel_ms(fn: Callable[[], torch.Tensor]) -> float:
    """GPU time (ms) of one call: the summed duration of the kernels it launched.

    A decode call also validates its inputs, which needs the scale's values on the host and
    so a synchronisation; per-call wall time then adds that fixed host latency (~0.25 ms) to
    the kernels' time. This is the kernels' own time, from the profiler.
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        fn()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in trace.key_averages()) / 1e3


def library_decompress(fmt: str, args_dict: dict, tensors: dict) -> Callable[[], torch.Tensor]:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args_dict))
    compressor = BaseCompressor.get_value_from_registry(fmt)
    return lambda: compressor.decompress(dict(tensors), scheme)["weight"]


def run(size: int, device: str, repeat: int, with_peer: bool) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    for label, (fmt, args_dict) in CASES.items():
        if fmt not in format_names():
            print(f"{label}: format not registered in this ctref, skipped", file=sys.stderr)
            continue
        args = QuantArgs.from_dict(args_dict, key="weights")
        weight = torch.randn(size, size, generator=generator).to(torch.bfloat16)
        codec = get_format(fmt)
        tensors = {k: v.to(device) for k, v in codec.encode(weight, args).items()}
        ours_ms, ours = timed(lambda: codec.decode(tensors, args, layout="dense"), repeat, device)
        copy_target = torch.empty_like(ours)
        copy_ms, _ = timed(lambda: copy_target.copy_(ours), repeat, device)
        moved = sum(t.numel() * t.element_size() for t in tensors.values())
        moved += ours.numel() * ours.element_size()
        row = {
            "case": label,
            "format": fmt,
            "shape": [size, size],
            "device": device,
            "ctref_ms": round(ours_ms, 3),
            "copy_ms": round(copy_ms, 3),
            "ctref_GBps": round(moved / ours_ms / 1e6, 1),
            "copy_GBps": round(2 * ours.numel() * ours.element_size() / copy_ms / 1e6, 1),
        }
        if device == "cuda":
            row["share_of_copy_bandwidth"] = round(row["ctref_GBps"] / row["copy_GBps"], 3)
            row["kernel_ms"] = round(
                kernel_ms(lambda: codec.decode(tensors, args, layout="dense")), 3
            )
            copy_kernel = kernel_ms(lambda: copy_target.copy_(ours))
            row["kernel_share_of_copy_bandwidth"] = round(
                moved / row["kernel_ms"] / (2 * ours.numel() * ours.element_size() / copy_kernel), 3
            )
        if with_peer:
            cpu_tensors = {k: v.cpu() for k, v in tensors.items()}
            if device == "cuda":
                cpu_tensors = {k: v.to(device) for k, v in cpu_tensors.items()}
            peer_ms, theirs = timed(library_decompress(fmt, args_dict, cpu_tensors), repeat, device)
            row["library_ms"] = round(peer_ms, 3)
            row["speedup"] = round(peer_ms / ours_ms, 1)
            row["identical_bits"] = bool(
                theirs.dtype == ours.dtype and torch.equal(theirs, ours)
            )
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    text = f"{row['case']:<38} ctref {row['ctref_ms']:8.2f} ms"
    if "library_ms" in row:
        text += (
            f" | library {row['library_ms']:8.2f} ms | {row['speedup']:6.1f}x"
            f" | identical bits: {row['identical_bits']}"
        )
    text += f" | copy {row['copy_ms']:6.2f} ms"
    if "share_of_copy_bandwidth" in row:
        text += (
            f" | {100 * row['share_of_copy_bandwidth']:.0f}% of copy bandwidth per call"
            f" | kernels {row['kernel_ms']:.3f} ms ="
            f" {100 * row['kernel_share_of_copy_bandwidth']:.0f}% of copy-kernel bandwidth"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="N = K of the square weight")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--no-peer", action="store_true", help="skip compressed-tensors")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    options = parser.parse_args(argv)
    try:
        import compressed_tensors  # noqa: F401

        with_peer = not options.no_peer
    except ImportError:
        print("compressed-tensors not installed: ctref figures only", file=sys.stderr)
        with_peer = False
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {options.device}"
        + (f" ({torch.cuda.get_device_name()})" if options.device == "cuda" else ""),
        flush=True,
    )
    rows = run(options.size, options.device, options.repeat, with_peer)
    if options.json:
        with open(options.json, "w") as handle:
            json.dump({"torch": torch.__version__, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
