"""A lazy, model-free reader of compressed-tensors checkpoint directories (ct-format.md §3.0).

Opening a directory reads ``config.json`` and the safetensors headers only; tensors are read one
module at a time, when asked. Every tensor name is split into a module prefix and a local name
(``name.rpartition(".")``); a module holding a weight *root* tensor (``weight``,
``weight_packed``, ``compressed`` + ``bitmask``, or marlin-24's ``meta`` + ``scale_packed``) is
resolved to its config group and format, which must agree with what the module stores.

Errors from formats name local tensors (``weight_scale``); this reader relocates them into the
checkpoint, so a message reads ``model-00001-of-00002.safetensors:
model.layers.0.mlp.down_proj.weight_scale: expected shape ...``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ctref import activations, transforms
from ctref.activations import ActivationParams
from ctref.config import QuantArgs, QuantizationConfig, QuantScheme, dtype_name
from ctref.errors import CTRefError
from ctref.formats import get_format
from ctref.formats.base import FLOAT_DTYPES
from ctref.matching import matches, resolve_format, resolve_scheme
from ctref.transforms import AppliedTransform

__all__ = ["Checkpoint", "ModuleInfo", "open_checkpoint"]

INDEX_SUFFIX = ".safetensors.index.json"
CONFIG_FILE = "config.json"

EMBEDDING_NAMES = frozenset(
    {
        "embed_tokens",
        "embed_in",
        "embed_positions",
        "wte",
        "wpe",
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
    }
)
"""Last name components that model-free resolution takes for ``Embedding`` modules."""

KV_PROJECTIONS = ("k_proj", "v_proj", "qkv_proj", "kv_b_proj")
"""Children that make a module an attention module owning a KV cache (0.20.0's rule)."""

_ATTENTION_NAME = re.compile(r".*(self_attn|attention)$")
"""0.20.0's KV-cache target ``re:.*(self_attn|attention)$``."""

_SPARSE_TENSORS = ("shape", "compressed", "bitmask", "row_offsets")
_LAYOUT_SENSITIVE_BITS = (3, 5, 6, 7)

_SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}
"""safetensors header dtype → torch dtype attribute (resolved lazily: older torch lacks some)."""

Device = str | torch.device | None


@dataclass(frozen=True)
class TensorHeader:
    """What a safetensors header says about one tensor, without reading it."""

    file: str
    dtype: torch.dtype | None
    dtype_name: str
    shape: tuple[int, ...]

    def describe_dtype(self) -> str:
        return dtype_name(self.dtype) if self.dtype is not None else self.dtype_name


@dataclass(frozen=True)
class ModuleInfo:
    """A module holding a weight: how the config resolves it and what it stores.

    ``group``/``scheme`` are None for modules the config leaves unquantized (untargeted or
    ignored); their ``format`` is ``dense``. ``sparsity_format`` is set when the weight is stored
    as ``compressed`` + ``bitmask`` and must be decoded before ``format``.
    """

    name: str
    group: str | None
    scheme: QuantScheme | None
    format: str
    sparsity_format: str | None
    weight_shape: tuple[int, ...]
    tensor_names: tuple[str, ...]
    file: str
    """The shard holding the module's root tensor."""

    @property
    def weight_args(self) -> QuantArgs | None:
        """The scheme's weight arguments; None for a module the config leaves unquantized."""
        return self.scheme.weights if self.scheme is not None else None


def open_checkpoint(
    path: str | Path, *, module_classes: Mapping[str, Sequence[str]] | None = None
) -> Checkpoint:
    """Open a checkpoint directory lazily: ``config.json`` and safetensors headers only.

    ``module_classes`` maps module names to their class and ancestor class names (e.g. from a
    real model); modules it lists are matched against class-name targets with those instead of
    the model-free rule of :meth:`Checkpoint.class_names`.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CTRefError(
            "not a directory; open the checkpoint directory holding config.json and "
            "*.safetensors",
            file=str(path),
        )
    files, weight_map, index_name = _checkpoint_files(directory)
    config = QuantizationConfig.load(directory)
    model_config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    handles: dict[str, Any] = {}
    try:
        headers = _read_headers(directory, files, handles)
        if weight_map is not None:
            _check_index(weight_map, headers, index_name)
    except BaseException:
        _close_all(handles)
        raise
    return Checkpoint(directory, config, model_config, handles, headers, module_classes or {})


class Checkpoint:
    """An open checkpoint: the parsed config, every tensor's header, one handle per shard.

    Use as a context manager (or call :meth:`close`) to release the memory-mapped files.
    """

    def __init__(
        self,
        directory: Path,
        config: QuantizationConfig,
        model_config: Mapping[str, Any],
        handles: Mapping[str, Any],
        headers: Mapping[str, TensorHeader],
        module_classes: Mapping[str, Sequence[str]],
    ) -> None:
        self.directory = directory
        self.config = config
        self.model_config = model_config
        self._handles = dict(handles)
        self._headers = dict(headers)
        self._module_classes = {name: tuple(classes) for name, classes in module_classes.items()}
        self._locals: dict[str, dict[str, str]] = {}
        for name in self._headers:
            module, _, local = name.rpartition(".")
            self._locals.setdefault(module, {})[local] = name
        self._all_modules = _all_module_names(self._locals)
        self._infos: dict[str, ModuleInfo] = {}
        self._transform_modules = _transform_module_names(config)

    # ------------------------------------------------------------------ files and tensors

    def close(self) -> None:
        _close_all(self._handles)
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def tensor_names(self) -> list[str]:
        return sorted(self._headers, key=_natural_key)

    def header(self, name: str) -> TensorHeader:
        """Dtype, shape and file of a tensor, from its safetensors header."""
        try:
            return self._headers[name]
        except KeyError:
            raise CTRefError("no tensor of this name in the checkpoint", tensor=name) from None

    def read(self, name: str, device: Device = None) -> torch.Tensor:
        """One tensor, read from its shard (and moved to ``device`` if given)."""
        header = self.header(name)
        if header.file not in self._handles:
            raise CTRefError("checkpoint is closed", file=header.file, tensor=name)
        tensor = self._handles[header.file].get_tensor(name)
        return tensor if device is None else tensor.to(device)

    def module_tensors(self, module: str, device: Device = None) -> dict[str, torch.Tensor]:
        """Every tensor of ``module`` by local name (``weight_scale``…); nothing else is read."""
        names = self._locals.get(module)
        if names is None:
            raise CTRefError("no tensors under this module name", tensor=module)
        return {local: self.read(name, device) for local, name in names.items()}

    def bias(self, module: str, device: Device = None) -> torch.Tensor | None:
        """The module's ``bias`` (always stored as in the base model), or None."""
        name = self._locals.get(module, {}).get("bias")
        return None if name is None else self.read(name, device)

    # ------------------------------------------------------------------ modules

    def modules(self) -> list[ModuleInfo]:
        """Every module holding a weight root tensor, in natural name order."""
        names = [module for module, local in self._locals.items() if root_tensor(local) is not None]
        return [self.module_info(name) for name in sorted(names, key=_natural_key)]

    def module_info(self, name: str) -> ModuleInfo:
        """Resolve one module: config group, format, weight shape, cross-checked with storage."""
        if name not in self._infos:
            self._infos[name] = self._resolve(name)
        return self._infos[name]

    def class_names(self, module: str) -> tuple[str, ...]:
        """Class names class-name targets are matched against (§3.0 step 3, model-free).

        ``module_classes`` given at open wins. Otherwise a checkpoint cannot tell classes, so:
        modules whose last name component is in :data:`EMBEDDING_NAMES` are ``Embedding``;
        modules named ``…norm``, transform submodules, and modules whose float weight is not
        2-D or 3-D (norm vectors, convolutions) have no class; every other weight-bearing module
        is ``Linear``. This is the library's own model-free rule ("Linear" matches every module
        except ``…norm``), narrowed so that ``["Linear"]`` configs do not claim embeddings; a
        guess the stored tensors contradict is dropped (:meth:`_scheme`).
        """
        if module in self._module_classes:
            return self._module_classes[module]
        local = self._locals.get(module, {})
        root = root_tensor(local)
        last = module.rpartition(".")[2]
        if root is None or last.endswith("norm") or last in self._transform_modules:
            return ()
        if last in EMBEDDING_NAMES:
            return ("Embedding",)
        if root == "weight" and len(self._headers[local["weight"]].shape) not in (2, 3):
            return ()
        return ("Linear",)

    def _resolve(self, name: str) -> ModuleInfo:
        local = self._locals.get(name, {})
        root = root_tensor(local)
        if root is None:
            raise CTRefError(
                "no weight-bearing module of this name (it stores no weight, weight_packed, "
                "compressed + bitmask or meta + scale_packed)",
                tensor=name,
            )
        classes = self.class_names(name)
        group, scheme = self._scheme(name, root, classes)
        fmt = resolve_format(self.config, scheme) if scheme is not None else "dense"
        if fmt == "dense" and root not in ("weight", "compressed"):
            raise self._root_mismatch(name, root, group, fmt, "weight", FLOAT_DTYPES)
        sparsity_format = self._sparsity_format(name, root, classes)
        weight_shape = self._weight_shape(name, root, scheme)
        self._check_root(name, root, group, scheme, fmt, weight_shape)
        return ModuleInfo(
            name=name,
            group=group,
            scheme=scheme,
            format=fmt,
            sparsity_format=sparsity_format,
            weight_shape=weight_shape,
            tensor_names=tuple(sorted(local.values())),
            file=self._headers[local[root]].file,
        )

    def _scheme(
        self, name: str, root: str, classes: Sequence[str]
    ) -> tuple[str, QuantScheme] | tuple[None, None]:
        """The config group of a module (§1.6), trusting the tensors over a guessed class.

        Transform submodules and vector (norm) weights are never quantized (§1.6: only Linear
        and Embedding weights are). When only a class-name target matches, the
        class comes from the model-free guess, and the module stores a float ``weight`` with no
        ``weight_scale``, the guess is taken as wrong (a MoE router or other non-Linear module
        that the writer skipped, §8 trap 25) and the module as unquantized.
        """
        if name.rpartition(".")[2] in self._transform_modules:
            return None, None
        resolved = resolve_scheme(self.config, name, classes)
        if resolved is None:
            return None, None
        local = self._locals[name]
        stores_float = root == "weight" and self._headers[local["weight"]].dtype in FLOAT_DTYPES
        if stores_float and len(self._headers[local["weight"]].shape) not in (2, 3):
            # A norm's or other vector's weight: only Linear/Embedding weights are quantized.
            return None, None
        guessed = name not in self._module_classes and resolve_scheme(self.config, name) is None
        quantized = resolve_format(self.config, resolved[1]) != "dense"
        if guessed and stores_float and quantized and "weight_scale" not in local:
            return None, None
        return resolved

    def _sparsity_format(self, name: str, root: str, classes: Sequence[str]) -> str | None:
        """The sparse format of a module storing ``compressed`` + ``bitmask``; the config must
        name one and target the module (§1.8)."""
        if root != "compressed":
            return None
        tensor, file = f"{name}.compressed", self._headers[f"{name}.compressed"].file
        sparsity = self.config.sparsity_config
        if sparsity is None or sparsity.format == "dense":
            raise CTRefError(
                "stores a sparse weight (compressed + bitmask) but quantization_config."
                "sparsity_config names no sparse format",
                file=file,
                tensor=tensor,
            )
        targeted = sparsity.targets is None or any(
            matches(target, name, classes) for target in sparsity.targets
        )
        if not targeted or any(matches(entry, name, classes) for entry in sparsity.ignore):
            raise CTRefError(
                "stores a sparse weight (compressed + bitmask) but sparsity_config.targets/"
                "ignore do not select this module",
                file=file,
                tensor=tensor,
            )
        return sparsity.format

    def _weight_shape(self, name: str, root: str, scheme: QuantScheme | None) -> tuple[int, ...]:
        """The dense weight's shape, from headers or from the small shape tensors.

        ``weight``: its header. ``weight_packed``: ``weight_shape`` if stored, else (uint8 FP4 /
        FP6 codes) ``8 / num_bits`` codes per byte. Sparse: the ``shape`` tensor. marlin-24:
        ``meta`` is ``(K/32, 2N)`` (§3.11).
        """
        local = self._locals[name]
        root_header = self._headers[local[root]]
        if root == "weight":
            return root_header.shape
        if root == "meta":
            rows, cols = root_header.shape
            return (cols // 2, rows * 32)
        shape_name = "shape" if root == "compressed" else "weight_shape"
        if shape_name in local:
            stored = self.read(local[shape_name])
            if stored.is_floating_point() or stored.numel() not in (2, 3):
                raise CTRefError(
                    f"must hold the 2 or 3 integer dimensions of the weight, found "
                    f"{dtype_name(stored.dtype)} {tuple(stored.shape)}",
                    file=self._headers[local[shape_name]].file,
                    tensor=local[shape_name],
                )
            return tuple(int(v) for v in stored.flatten().tolist())
        args = scheme.weights if scheme is not None else None
        if root == "weight_packed" and root_header.dtype == torch.uint8 and args is not None:
            *lead, rows, cols = root_header.shape
            return (*lead, rows, cols * 8 // args.num_bits)
        raise CTRefError(
            f"required beside {root} to give the unpadded weight shape",
            file=root_header.file,
            tensor=f"{name}.{shape_name}",
        )

    def _check_root(
        self,
        name: str,
        root: str,
        group: str | None,
        scheme: QuantScheme | None,
        fmt: str,
        weight_shape: tuple[int, ...],
    ) -> None:
        """The stored root must be what the resolved format stores (§3.0 step 4)."""
        local = self._locals[name]
        header = self._headers[local[root]]
        # A sparse weight holds the quantization format's `weight` (its codes) in `compressed`.
        stored_name = "weight" if root == "compressed" else root
        args = scheme.weights if scheme is not None else None
        try:
            specs = get_format(fmt).expected_tensors(
                args, weight_shape, layout=self.config.packing_layout
            )
        except CTRefError as error:
            raise error.located(file=header.file, module=name) from error
        spec = next((s for s in specs if s.name == stored_name), None)
        if spec is not None and header.dtype in spec.dtypes:
            return
        expected = spec or specs[0]
        raise self._root_mismatch(name, root, group, fmt, expected.name, expected.dtypes)

    def _root_mismatch(
        self,
        name: str,
        root: str,
        group: str | None,
        fmt: str,
        expected_name: str,
        expected_dtypes: Sequence[torch.dtype],
    ) -> CTRefError:
        local = self._locals[name]
        header = self._headers[local[root]]
        stored_name = "weight" if root == "compressed" else root
        if group is None:
            why = "the config leaves this module unquantized (untargeted or ignored)"
        else:
            why = f"config group '{group}' resolves to format '{fmt}'"
        allowed = " or ".join(dtype_name(d) for d in expected_dtypes)
        return CTRefError(
            f"{why}, which stores '{expected_name}' as {allowed}; this module stores "
            f"'{stored_name}' as {header.describe_dtype()}",
            file=header.file,
            tensor=local[root],
        )

    # ------------------------------------------------------------------ dequantization

    def dequantize(self, name: str, device: Device = None) -> torch.Tensor:
        """The dense weight of one module; only that module's tensors are read.

        Sparsity is decoded first, then the quantization format with the config's packing
        layout. Unquantized modules return their stored ``weight`` unchanged. The dtype is the
        format's: the scale dtype for int/fp8, bf16 for NVFP4 and MX.
        """
        info = self.module_info(name)
        self._check_packing_layout_known(info)
        tensors = self.module_tensors(name, device)
        try:
            if info.sparsity_format is not None:
                weight = get_format(info.sparsity_format).decode(
                    tensors, None, layout=self.config.packing_layout
                )
                tensors = {k: v for k, v in tensors.items() if k not in _SPARSE_TENSORS}
                tensors["weight"] = weight
            return get_format(info.format).decode(
                tensors, info.weight_args, layout=self.config.packing_layout
            )
        except CTRefError as error:
            raise self._located(error, name) from error

    def effective_weight(
        self, name: str, device: Device = None
    ) -> tuple[torch.Tensor, list[AppliedTransform]]:
        """The float64 weight the layer effectively applies, and the transforms that act on it.

        The dequantized weight with the checkpoint's online ``transform_config`` transforms folded
        in (:func:`ctref.transforms.effective_weight`); without a transform config it is the
        dequantized weight itself and the list is empty.
        """
        weight = self.dequantize(name, device)
        config = self.config.transform_config
        if config is None:
            return weight, []
        return transforms.effective_weight(
            name,
            weight,
            config,
            lambda tensor: self.read(tensor, device) if tensor in self._headers else None,
            stored_names=self._headers.keys(),
            class_names=self.class_names(name),
        )

    def iter_dequantized(self, device: Device = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(module name, dense weight)`` for every module, one module in memory at a time."""
        for info in self.modules():
            yield info.name, self.dequantize(info.name, device)

    def _check_packing_layout_known(self, info: ModuleInfo) -> None:
        """3/5/6/7-bit packing differs before and after 0.18.0; only ``version`` tells (§0 #3)."""
        args = info.weight_args
        if (
            info.format == "pack-quantized"
            and args is not None
            and args.num_bits in _LAYOUT_SENSITIVE_BITS
            and not self.config.packing_layout_known
        ):
            raise CTRefError(
                f"{args.num_bits}-bit pack-quantized words are laid out differently by writers "
                f"before and after compressed-tensors 0.18.0, and quantization_config.version "
                f'is missing or unparseable ({self.config.version!r}); set "version" to the '
                "compressed-tensors version that wrote the checkpoint",
                file=CONFIG_FILE,
                tensor=f"{info.name}.weight_packed",
                key="quantization_config.version",
            )

    def _located(self, error: CTRefError, module: str) -> CTRefError:
        """Place a format's error: the file of the tensor it names, else of the module's root."""
        header = self._headers.get(f"{module}.{error.tensor}") if error.tensor else None
        file = header.file if header is not None else self._root_file(module)
        return error.located(file=file, module=module)

    def _root_file(self, module: str) -> str | None:
        local = self._locals.get(module, {})
        root = root_tensor(local)
        name = local[root] if root is not None else next(iter(local.values()), None)
        return self._headers[name].file if name is not None else None

    # ------------------------------------------------------------------ activations and KV cache

    def attention_modules(self) -> list[str]:
        """Modules owning a KV projection child (``k_proj``, ``v_proj``, ``qkv_proj``,
        ``kv_b_proj``) or named ``…self_attn`` / ``…attention`` (§1.7)."""
        return list(self._attention_modules)

    @functools.cached_property
    def _attention_set(self) -> frozenset[str]:
        return frozenset(self._attention_modules)

    @functools.cached_property
    def _attention_modules(self) -> tuple[str, ...]:
        found = set()
        for module in self._all_modules:
            parent, _, last = module.rpartition(".")
            if last in KV_PROJECTIONS:
                found.add(parent)
            if _ATTENTION_NAME.match(module):
                found.add(module)
        return tuple(sorted(found, key=_natural_key))

    def activation_params(self, module: str) -> ActivationParams:
        """The activation / attention parameters a module stores and those its scheme needs.

        Attention modules report ``q``/``k``/``v`` scales (:meth:`kv_cache_scales`); other
        modules ``input_*`` and ``output_*`` by their config group. Present tensors are
        validated (dtype, shape, finite and positive scales); absent ones are listed as missing.
        """
        if module in self._attention_set:
            return self._attention_params(module)
        local = self._locals.get(module)
        if local is None:
            raise CTRefError("no tensors under this module name", tensor=module)
        expected: list[activations.ExpectedParam] = []
        if root_tensor(local) is not None:
            info = self.module_info(module)
            if info.scheme is not None and not self._marlin_checkpoint():
                expected = activations.linear_expectations(
                    info.scheme, info.weight_shape, f"config_groups.{info.group}"
                )
        stored = {
            name: self.read(local[name]) for name in activations.LINEAR_PARAMS if name in local
        }
        return self._checked(module, stored, expected, {})

    def kv_cache_scales(self) -> dict[str, ActivationParams]:
        """The q/k/v scale record of every attention module, by module name."""
        return {module: self._attention_params(module) for module in self.attention_modules()}

    def _attention_params(self, module: str) -> ActivationParams:
        """Expectations as 0.20.0 initializes attention: a config group narrowly targeting the
        module quantizes q, k and v with its input args; otherwise ``kv_cache_scheme`` k and v."""
        q_args, kv_args = None, self.config.kv_cache_scheme
        q_where = kv_where = "kv_cache_scheme"
        resolved = resolve_scheme(self.config, module, self.class_names(module))
        if resolved is not None and self._narrowly_targets(resolved[1], module):
            group, scheme = resolved
            if scheme.input_activations is not None:
                q_args = kv_args = scheme.input_activations
                q_where = kv_where = f"config_groups.{group}.input_activations"
        expected: list[activations.ExpectedParam] = []
        if not self._marlin_checkpoint():
            heads, kv_heads = _head_counts(self.model_config)
            expected = activations.attention_expectations(
                q_args, kv_args, heads, kv_heads, q_where=q_where, kv_where=kv_where
            )
        local = self._locals.get(module, {})
        stored = {
            name: self.read(local[name]) for name in activations.ATTENTION_PARAMS if name in local
        }
        legacy: dict[str, str] = {}
        for kind in ("k", "v"):
            legacy_local = f"{kind}_proj.output_scale"
            legacy_name = f"{module}.{legacy_local}"
            if f"{kind}_scale" not in stored and legacy_name in self._headers:
                stored[f"{kind}_scale"] = self.read(legacy_name)
                legacy[f"{kind}_scale"] = legacy_local
        return self._checked(module, stored, expected, legacy)

    def _narrowly_targets(self, scheme: QuantScheme, module: str) -> bool:
        """0.20.0's ``is_narrow_match``: a target selects the module but neither its parent
        nor any descendant (so ``re:.*self_attn.*`` quantizes the projections, not attention)."""
        parent = module.rpartition(".")[0]
        descendants = [m for m in self._all_modules if m.startswith(module + ".")]
        return any(
            matches(target, module, self.class_names(module))
            and not matches(target, parent, self.class_names(parent))
            and not any(matches(target, d, self.class_names(d)) for d in descendants)
            for target in scheme.targets
        )

    def _marlin_checkpoint(self) -> bool:
        """marlin-24 writers drop every ``*_scale``/``*zero_point`` of the model (§3.11)."""
        return any(
            resolve_format(self.config, scheme) == "marlin-24"
            for scheme in self.config.config_groups.values()
        )

    def _checked(
        self,
        module: str,
        stored: Mapping[str, torch.Tensor],
        expected: Sequence[activations.ExpectedParam],
        legacy: Mapping[str, str],
    ) -> ActivationParams:
        try:
            return activations.check_activation_params(module, stored, expected, legacy)
        except CTRefError as error:
            raise self._located(error, module) from error


# ---------------------------------------------------------------------------------------------
# Opening: files, headers, index


def _checkpoint_files(directory: Path) -> tuple[list[str], dict[str, str] | None, str | None]:
    """The shard files, and the index's weight map when there is one.

    With an index, the checkpoint is the files it names (other ``*.safetensors`` files, such as
    Mistral's ``consolidated.safetensors``, are not part of it); without one, every
    ``*.safetensors`` file in the directory.
    """
    indexes = sorted(p.name for p in directory.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        raise CTRefError(
            f"several safetensors indexes ({', '.join(indexes)}); a checkpoint has at most one",
            file=str(directory),
        )
    if indexes:
        weight_map = _read_index(directory / indexes[0])
        files = sorted(set(weight_map.values()))
        for file in files:
            if not (directory / file).is_file():
                tensor = next(name for name, f in weight_map.items() if f == file)
                raise CTRefError(
                    f"indexed in {file}, which does not exist", file=indexes[0], tensor=tensor
                )
        return files, weight_map, indexes[0]
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in directory.glob("*.bin"))
        if pickles:
            raise CTRefError(
                "the directory holds only PyTorch pickle weights (.bin); ctref reads "
                "safetensors and never unpickles: convert the checkpoint to .safetensors",
                file=pickles[0],
            )
        raise CTRefError("no .safetensors files in the directory", file=str(directory))
    return files, None, None


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CTRefError(f"not valid JSON ({error})", file=path.name) from None
    weight_map = index.get("weight_map") if isinstance(index, Mapping) else None
    if not isinstance(weight_map, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CTRefError(
            "must map tensor names to file names (strings)", file=path.name, key="weight_map"
        )
    return dict(weight_map)


def _read_headers(
    directory: Path, files: Sequence[str], handles: dict[str, Any]
) -> dict[str, TensorHeader]:
    """Open each shard (memory-mapped; nothing is read but the header) and list its tensors."""
    headers: dict[str, TensorHeader] = {}
    for file in files:
        try:
            handle = _open_shard(directory / file)
        except Exception as error:  # safetensors raises its own error types for bad headers
            raise CTRefError(f"cannot read the safetensors header ({error})", file=file) from None
        handles[file] = handle
        for name in handle.keys():
            if name in headers:
                raise CTRefError(
                    f"also stored in {headers[name].file}; a tensor lives in one file",
                    file=file,
                    tensor=name,
                )
            tensor_slice = handle.get_slice(name)
            dtype_name = tensor_slice.get_dtype()
            headers[name] = TensorHeader(
                file=file,
                dtype=_torch_dtype(dtype_name),
                dtype_name=dtype_name,
                shape=tuple(tensor_slice.get_shape()),
            )
    return headers


def _check_index(
    weight_map: Mapping[str, str], headers: Mapping[str, TensorHeader], index_name: str | None
) -> None:
    """Every indexed tensor is in its file, and every stored tensor is indexed to its file."""
    for name, file in weight_map.items():
        header = headers.get(name)
        if header is None:
            raise CTRefError(
                f"listed in {index_name} but not stored in this file", file=file, tensor=name
            )
        if header.file != file:
            raise CTRefError(
                f"stored here, but {index_name} maps it to {file}", file=header.file, tensor=name
            )
    for name, header in headers.items():
        if name not in weight_map:
            raise CTRefError(
                f"stored here but not listed in {index_name}", file=header.file, tensor=name
            )


def _close_all(handles: Mapping[str, Any]) -> None:
    for handle in handles.values():
        handle.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _open_shard(path: Path) -> Any:
    """A safetensors handle reading with ``pread``: a memory map would keep every byte read
    resident in the process, so memory would grow with the checkpoint instead of the module.
    Older safetensors have only the memory map."""
    try:
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:
        return safe_open(str(path), framework="pt")


def root_tensor(local: Mapping[str, str]) -> str | None:
    """The local name of a module's weight root tensor (§3.0 step 2), or None.

    ``local`` maps a module's local tensor names (``weight_packed``…) to anything.
    """
    if "compressed" in local and "bitmask" in local:
        return "compressed"
    if "meta" in local and "scale_packed" in local:
        return "meta"
    for name in ("weight_packed", "weight"):
        if name in local:
            return name
    return None


def _all_module_names(locals_by_module: Mapping[str, Mapping[str, str]]) -> set[str]:
    """Every module prefix, with the ancestors that own no tensor of their own."""
    names: set[str] = set()
    for module in locals_by_module:
        parts = module.split(".")
        names.update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
    return names


def _transform_module_names(config: QuantizationConfig) -> frozenset[str]:
    """Last name components of online transform submodules, ``<scheme>_<location>`` (§1.9)."""
    if config.transform_config is None:
        return frozenset()
    return frozenset(
        f"{name}_{args.location}"
        for name, scheme in config.transform_config.config_groups.items()
        for args in scheme.apply
    )


def _head_counts(model_config: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """``num_attention_heads`` and ``num_key_value_heads`` (defaulting to the former) from
    ``config.json`` or its ``text_config``; None where the file does not say."""
    for section in (model_config, model_config.get("text_config")):
        if isinstance(section, Mapping) and isinstance(section.get("num_attention_heads"), int):
            heads = section["num_attention_heads"]
            kv_heads = section.get("num_key_value_heads")
            return heads, kv_heads if isinstance(kv_heads, int) else heads
    return None, None


def _torch_dtype(name: str) -> torch.dtype | None:
    attribute = _SAFETENSORS_DTYPES.get(name)
    return getattr(torch, attribute, None) if attribute is not None else None


def _natural_key(name: str) -> list[Any]:
    """``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
