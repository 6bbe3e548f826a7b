"""``ctref dequant`` against compressed-tensors' ``convert_checkpoint``, same checkpoint, one run.

Builds (once, cached in ``--workdir``) a synthetic Llama-shaped checkpoint of more than 1 GB with
three formats: attention projections FP8 block 128x128 (``FP8_BLOCK``, float-quantized),
gate/up W4A16 group 128 (pack-quantized), down NVFP4 (``NVFP4A16``, nvfp4-pack-quantized; W4A16
when this ctref has no NVFP4), written with ctref's own encoders. Then dequantizes it to bf16
twice, each in its own process:

* the library: ``convert_checkpoint(src, out, CompressedTensorsDequantizer(src), device="cpu")``;
* ctref: ``ctref dequant src out --quiet``.

Prints, for each: wall time of the conversion call and of the whole process (imports included),
the process's CPU time (user + system: less sensitive than wall time to other load), peak RSS
(``wait4``'s ``ru_maxrss`` of that process), the ratios, whether every output tensor is
bit-identical, and the targets (ctref >= 5x faster; ctref peak RSS <= 3 x the largest module's
dense bf16 size + 300 MB). The load average is printed beside the figures: other work on the
machine slows both runs; repeat when it is quiet.

    python benchmarks/bench_dequant.py                   # 8 layers, 4096 hidden, ~1.2 GB
    python benchmarks/bench_dequant.py --layers 2 --cores 2 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ctref.config import QuantArgs
from ctref.formats import format_names, get_format
from ctref.presets import PRESET_SCHEMES

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGET_SPEEDUP = 5.0
RSS_ALLOWANCE = 300 * 2**20

LIBRARY_JOB = """
import json, sys, time, torch
from compressed_tensors.entrypoints.convert import convert_checkpoint, CompressedTensorsDequantizer
source, out = sys.argv[1], sys.argv[2]
start = time.perf_counter()
dequantizer = CompressedTensorsDequantizer(source, dtype=torch.bfloat16)
convert_checkpoint(source, out, dequantizer, device="cpu")
print(json.dumps({"seconds": time.perf_counter() - start}))
"""

CTREF_JOB = """
import json, sys, time
from ctref.cli import main
start = time.perf_counter()
code = main(["dequant", sys.argv[1], sys.argv[2], "--quiet"])
print(json.dumps({"seconds": time.perf_counter() - start}))
sys.exit(code)
"""


def groups(down_format: str) -> dict[str, tuple[str, dict]]:
    """Module-name regex → (format, scheme), as 0.20.0 would infer the format."""
    down = "NVFP4A16" if down_format == "nvfp4-pack-quantized" else "W4A16"
    return {
        r"re:.*self_attn\.(q|k|v|o)_proj$": ("float-quantized", PRESET_SCHEMES["FP8_BLOCK"]),
        r"re:.*mlp\.(gate|up)_proj$": ("pack-quantized", PRESET_SCHEMES["W4A16"]),
        r"re:.*mlp\.down_proj$": (down_format, PRESET_SCHEMES[down]),
    }


def build_checkpoint(path: Path, layers: int, hidden: int, ffn: int, vocab: int) -> None:
    """Write the synthetic checkpoint, one shard per two layers, with ctref's encoders."""
    down_format = (
        "nvfp4-pack-quantized" if "nvfp4-pack-quantized" in format_names() else "pack-quantized"
    )
    plan = groups(down_format)
    generator = torch.Generator().manual_seed(0)

    def dense(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    def encode(
        prefix: str, weight: torch.Tensor, fmt: str, scheme: dict
    ) -> dict[str, torch.Tensor]:
        args = QuantArgs.from_dict(scheme["weights"], key="weights")
        return {
            f"{prefix}.{k}": v.contiguous() for k, v in get_format(fmt).encode(weight, args).items()
        }

    shapes = {name: (hidden, hidden) for name in ATTENTION}
    shapes.update(gate_proj=(ffn, hidden), up_proj=(ffn, hidden), down_proj=(hidden, ffn))
    path.mkdir(parents=True, exist_ok=True)
    shard_count = (layers + 1) // 2 + 1
    weight_map: dict[str, str] = {}

    def save(index: int, tensors: dict[str, torch.Tensor]) -> None:
        file = f"model-{index + 1:05d}-of-{shard_count:05d}.safetensors"
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))

    save(
        0,
        {
            "model.embed_tokens.weight": dense(vocab, hidden),
            "lm_head.weight": dense(vocab, hidden),
            "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        },
    )
    for shard in range(1, shard_count):
        tensors: dict[str, torch.Tensor] = {}
        for layer in range(2 * (shard - 1), min(2 * shard, layers)):
            prefix = f"model.layers.{layer}"
            tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
            for name, shape in shapes.items():
                module = f"{prefix}.{'self_attn' if name in ATTENTION else 'mlp'}.{name}"
                fmt, scheme = next(
                    (fmt, scheme)
                    for target, (fmt, scheme) in plan.items()
                    if re.match(target.removeprefix("re:"), module)
                )
                tensors.update(encode(module, dense(*shape), fmt, scheme))
            print(f"  encoded layer {layer}", file=sys.stderr, flush=True)
        save(shard, tensors)
    config_groups = {
        f"group_{i}": {"targets": [target], **scheme, "format": fmt}
        for i, (target, (fmt, scheme)) in enumerate(plan.items())
    }
    quantization_config = {
        "quant_method": "compressed-tensors",
        "version": "0.20.0",
        "format": "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ["lm_head"],
        "sparsity_config": {},
        "transform_config": {},
    }
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128,
        "vocab_size": vocab,
        "torch_dtype": "bfloat16",
        "quantization_config": quantization_config,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    total = sum((path / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "generation_config.json").write_text('{"do_sample": false}')


def run_job(name: str, code: str, source: Path, out: Path, cores: int | None) -> dict:
    """Run one conversion in a fresh process; its time, whole-process time and peak RSS.

    The process's stderr (progress bars, library logging) goes to ``<out>.log``.
    """
    shutil.rmtree(out, ignore_errors=True)
    load_before = os.getloadavg()[0]
    affinity = sorted(os.sched_getaffinity(0))[:cores] if cores else None
    log = out.with_name(out.name + ".log")
    start = time.perf_counter()
    with log.open("wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(source), str(out)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            preexec_fn=(lambda: os.sched_setaffinity(0, affinity)) if affinity else None,
        )
        output = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
    process_seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed; its stderr is in {log}")
    reported = json.loads(output.decode().strip().splitlines()[-1])
    return {
        "seconds": reported["seconds"],
        "process_seconds": process_seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def compare(ours: Path, theirs: Path) -> dict:
    """Tensor by tensor: same names, dtypes and bytes? One tensor in memory at a time."""

    def tensors(directory: Path) -> dict[str, Path]:
        found = {}
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                found.update(dict.fromkeys(handle.keys(), file))
        return found

    mine, library = tensors(ours), tensors(theirs)
    identical, different = 0, []
    for name in sorted(set(mine) & set(library)):
        with safe_open(str(mine[name]), "pt") as a, safe_open(str(library[name]), "pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
            same = (
                x.dtype == y.dtype
                and x.shape == y.shape
                and torch.equal(
                    x.view(torch.uint8) if x.element_size() == 1 else x,
                    y.view(torch.uint8) if y.element_size() == 1 else y,
                )
            )
        if same:
            identical += 1
        else:
            different.append(name)
    configs = [json.loads((d / "config.json").read_text()) for d in (ours, theirs)]
    return {
        "identical": identical,
        "different": different,
        "only_ctref": sorted(set(mine) - set(library)),
        "only_library": sorted(set(library) - set(mine)),
        "configs_without_quantization_config": all("quantization_config" not in c for c in configs),
    }


def largest_dense_module(source: Path) -> int:
    """Bytes of the largest module's dense bf16 weight (from the shapes the config implies)."""
    config = json.loads((source / "config.json").read_text())
    return config["intermediate_size"] * config["hidden_size"] * 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ctref-bench-dequant"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--cores", type=int, help="pin both processes to this many cores")
    parser.add_argument("--keep", action="store_true", help="keep the two output directories")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    options = parser.parse_args(argv)

    name = f"ckpt-L{options.layers}-H{options.hidden}-F{options.ffn}-V{options.vocab}"
    source = options.workdir / name
    if not (source / "config.json").exists():
        print(f"writing the synthetic checkpoint to {source}", file=sys.stderr)
        shutil.rmtree(source, ignore_errors=True)
        build_checkpoint(source, options.layers, options.hidden, options.ffn, options.vocab)
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    formats = sorted(
        {
            g["format"]
            for g in json.loads((source / "config.json").read_text())["quantization_config"][
                "config_groups"
            ].values()
        }
    )
    cores = options.cores or len(os.sched_getaffinity(0))
    print(
        f"checkpoint {source}: {size / 1e9:.2f} GB, formats {', '.join(formats)}; "
        f"{cores} cores, torch {torch.__version__}"
    )

    library = run_job(
        "compressed-tensors", LIBRARY_JOB, source, options.workdir / "out-library", options.cores
    )
    ours = run_job("ctref", CTREF_JOB, source, options.workdir / "out-ctref", options.cores)
    comparison = compare(options.workdir / "out-ctref", options.workdir / "out-library")
    if not options.keep:
        for directory in ("out-library", "out-ctref"):
            shutil.rmtree(options.workdir / directory, ignore_errors=True)

    rss_target = 3 * largest_dense_module(source) + RSS_ALLOWANCE
    speedup = library["seconds"] / ours["seconds"]
    for label, row in (("compressed-tensors", library), ("ctref dequant", ours)):
        print(
            f"{label:<20} {row['seconds']:7.2f} s conversion, {row['process_seconds']:7.2f} s "
            f"process, {row['cpu_seconds']:7.2f} CPU s, peak RSS "
            f"{row['peak_rss_bytes'] / 2**20:6.0f} MiB "
            f"(load average {row['load_before']:.1f} -> {row['load_after']:.1f})"
        )
    print(
        f"speedup {speedup:.1f}x on the conversion, "
        f"{library['process_seconds'] / ours['process_seconds']:.1f}x on the process, "
        f"{library['cpu_seconds'] / ours['cpu_seconds']:.1f}x in CPU time "
        f"(target >= {TARGET_SPEEDUP:.0f}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'})"
    )
    largest = largest_dense_module(source)
    print(
        f"ctref peak RSS {ours['peak_rss_bytes'] / 2**20:.0f} MiB vs target "
        f"{rss_target / 2**20:.0f} MiB (3 x {largest / 2**20:.0f} MiB + 300 MiB): "
        f"{'met' if ours['peak_rss_bytes'] <= rss_target else 'NOT met'}"
    )
    shared = comparison["identical"] + len(comparison["different"])
    print(
        f"output tensors bit-identical: {comparison['identical']} of {shared} shared; "
        f"different {comparison['different'][:5]}, only in ctref's output "
        f"{comparison['only_ctref'][:5]}, only in the library's {comparison['only_library'][:5]}"
    )
    if os.getloadavg()[0] > cores:
        print(
            f"note: load average {os.getloadavg()[0]:.1f} on {cores} cores: the machine is busy, "
            "so both times are inflated; repeat when it is quiet",
            file=sys.stderr,
        )
    if options.json:
        options.json.write_text(
            json.dumps(
                {
                    "checkpoint_bytes": size,
                    "formats": formats,
                    "cores": cores,
                    "library": library,
                    "ctref": ours,
                    "speedup": speedup,
                    "rss_target_bytes": rss_target,
                    "comparison": comparison,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
