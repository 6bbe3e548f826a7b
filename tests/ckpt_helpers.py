"""Writing tiny checkpoint directories in tests: config.json plus safetensors shards.

Tensors are encoded with ctref's own format encoders (proven bit-exact against the peer
elsewhere), so a reader test checks the reader's plumbing, not the encoders.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ctref import QuantArgs, get_format

INDEX_FILE = "model.safetensors.index.json"


def quant_config(
    groups: Mapping[str, Mapping[str, Any]],
    *,
    ignore: Sequence[str] = (),
    version: str | None = "0.20.0",
    **extra: Any,
) -> dict[str, Any]:
    """A ``quantization_config`` dict as 0.20.0 writes it (``version`` None leaves it out)."""
    config: dict[str, Any] = {
        "quant_method": "compressed-tensors",
        "config_groups": {name: dict(group) for name, group in groups.items()},
        "ignore": list(ignore),
        "quantization_status": "compressed",
        "format": "mixed-precision",
        "sparsity_config": {},
        "transform_config": {},
        **extra,
    }
    if version is not None:
        config["version"] = version
    return config


def encode(
    prefix: str, weight: torch.Tensor, fmt: str, args: Mapping[str, Any] | None, **kwargs: Any
) -> dict[str, torch.Tensor]:
    """``{f"{prefix}.{local}": tensor}`` of ``weight`` encoded in format ``fmt``."""
    quant_args = None if args is None else QuantArgs.from_dict(args, key="weights")
    tensors = get_format(fmt).encode(weight, quant_args, **kwargs)
    return {f"{prefix}.{local}": tensor for local, tensor in tensors.items()}


def write_checkpoint(
    directory: Path,
    tensors: Mapping[str, torch.Tensor],
    quantization_config: Mapping[str, Any] | None,
    *,
    shards: int = 1,
    model_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` and the tensors; ``shards > 1`` splits them in name order and
    writes ``model.safetensors.index.json``. Returns ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], **(model_config or {})}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    names = sorted(tensors)
    if shards == 1:
        save_file(_contiguous(tensors, names), str(directory / "model.safetensors"))
        return directory
    weight_map = {}
    per_shard = -(-len(names) // shards)
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[index * per_shard : (index + 1) * per_shard]
        save_file(_contiguous(tensors, chunk), str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in chunk})
    index_json = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index_json, indent=2), encoding="utf-8")
    return directory


def _contiguous(
    tensors: Mapping[str, torch.Tensor], names: Sequence[str]
) -> dict[str, torch.Tensor]:
    return {name: tensors[name].contiguous() for name in names}
