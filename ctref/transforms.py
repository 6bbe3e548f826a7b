"""Transforms of ``transform_config`` (spec §1.9): their matrices, and a layer's effective weight.

A transform multiplies activations (or, fused at write time, the weight) by an orthogonal or
invertible matrix ``T``; activations go ``x -> x @ T``. Where the checkpoint stands:

* ``weight_input`` / ``weight_output`` were fused into the weight (in float64) before
  quantization and removed: the stored weight is already rotated and nothing else is stored.
* ``input`` / ``output`` (and the attention-level ``q_attn`` / ``k_cache``) run online. The
  matrix is stored as ``<p>.<scheme>_<location>.weight``, shape ``(s, s)`` with ``s`` the
  ``head_dim`` or the layer's in/out features; a smaller ``s`` is applied block-diagonally.
  Hadamard kinds are stored unnormalized (entries ±1, ``H Hᵀ = s·I``) with an int64
  ``<…>.perm`` when ``randomize`` is true, and the runtime uses ``T = P H Pᵀ / √s``
  (transposed for ``inverse``). A random matrix is stored as the runtime uses it (its inverse when
  ``inverse``).
* The runtime computes in the stored tensor's dtype. The writer stores the scheme's
  ``precision``, except that one scheme shares a single matrix per size: whichever location
  created it first fixes its dtype (a ``weight_input`` first makes the online copy float64).
* Shared matrices are tied: ``save_pretrained`` keeps one copy per scheme and size (one per
  ``inverse`` too for random matrices), under the first module in model order, and drops the
  others' names. :func:`effective_weight` finds that copy among ``stored_names``.

Only deterministic (Sylvester) Hadamard matrices can be constructed, for power-of-two sizes as
in the library. Random-Hadamard matrices of other sizes (12·2^k, 20·2^k, …) derive from known
matrices the library ships as data; ctref never builds them, it validates the stored ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ctref.config import TransformArgs, TransformConfig, TransformScheme
from ctref.errors import CTRefError
from ctref.matching import matches

__all__ = [
    "ATTENTION",
    "FOLDED",
    "FUSED_AT_WRITE",
    "AppliedTransform",
    "ApplyEntry",
    "TensorLookup",
    "apply_online",
    "attention_transforms",
    "check_hadamard",
    "check_permutation",
    "effective_bias",
    "effective_weight",
    "hadamard_matrix",
    "selected_entries",
]

TensorLookup = Callable[[str], torch.Tensor | None]
"""Returns the stored tensor of a full name (``model.layers.0.mlp.down_proj.v_input.weight``),
or None when the checkpoint has no such tensor."""

FOLDED = "folded"
"""An online ``input``/``output`` transform, folded into the effective weight."""
FUSED_AT_WRITE = "fused-at-write"
"""A ``weight_input``/``weight_output`` transform: already in the stored weight."""
ATTENTION = "attention"
"""A ``q_attn``/``k_cache`` transform: acts on query/key states, never on a Linear weight."""

_HADAMARD_TYPES = ("hadamard", "random-hadamard")
_OFFLINE_LOCATIONS = ("weight_input", "weight_output")
_ATTENTION_LOCATIONS = ("q_attn", "k_cache")
_INPUT_SIDE_LOCATIONS = ("input", "weight_input")


def hadamard_matrix(size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The unnormalized Sylvester Hadamard matrix that ``hadamard`` transforms store.

    ``H[i, j] = (-1) ** popcount(i & j)``, i.e. ``H_2n = [[H_n, H_n], [H_n, -H_n]]`` from
    ``H_1 = [[1]]``. Other sizes raise: the library's deterministic Hadamard is powers of two only.
    """
    if size < 1 or size & (size - 1):
        raise CTRefError(
            f"a deterministic (Sylvester) Hadamard matrix needs a power-of-two size, got {size}"
        )
    index = torch.arange(size)
    common_bits = index[:, None] & index[None, :]
    parity = torch.zeros_like(common_bits)
    for bit in range(size.bit_length()):
        parity ^= (common_bits >> bit) & 1
    return (1 - 2 * parity).to(dtype)


def check_hadamard(matrix: torch.Tensor, *, tensor: str) -> None:
    """A stored Hadamard weight: square, entries exactly ±1, ``H Hᵀ = s·I`` (exact in float64)."""
    size = _check_square(matrix, tensor=tensor)
    values = matrix.to(torch.float64)
    if not torch.equal(values.abs(), torch.ones_like(values)):
        raise CTRefError("a stored Hadamard matrix has entries +1 and -1 only", tensor=tensor)
    if not torch.equal(values @ values.T, size * torch.eye(size, dtype=torch.float64)):
        raise CTRefError(
            f"not a Hadamard matrix: H @ H.T must equal {size} * I (rows orthogonal)",
            tensor=tensor,
        )


def check_permutation(perm: torch.Tensor, size: int, *, tensor: str) -> None:
    """A stored ``perm``: integers of shape ``(size,)`` holding each of ``0 … size-1`` once."""
    if perm.dtype.is_floating_point or perm.dtype.is_complex or perm.dtype == torch.bool:
        raise CTRefError(f"must be an integer tensor (int64), got {perm.dtype}", tensor=tensor)
    if tuple(perm.shape) != (size,):
        raise CTRefError(
            f"must have shape ({size},) to permute a {size}x{size} matrix, got {tuple(perm.shape)}",
            tensor=tensor,
        )
    if not torch.equal(torch.sort(perm.to(torch.int64)).values, torch.arange(size)):
        raise CTRefError(f"not a permutation of 0..{size - 1}", tensor=tensor)


class ApplyEntry(NamedTuple):
    """One ``apply`` entry of ``transform_config``, with the scheme it belongs to."""

    scheme_name: str
    scheme: TransformScheme
    args: TransformArgs


def selected_entries(
    config: TransformConfig, name: str, class_names: Sequence[str]
) -> list[ApplyEntry]:
    """The ``apply`` entries whose targets select the module and whose ignore does not, in the
    order the writer registered them (scheme, then entry)."""
    return [
        ApplyEntry(scheme_name, scheme, args)
        for scheme_name, scheme in config.config_groups.items()
        for args in scheme.apply
        if any(matches(target, name, class_names) for target in args.targets)
        and not any(matches(entry, name, class_names) for entry in args.ignore)
    ]


@dataclass(frozen=True)
class AppliedTransform:
    """One transform of ``transform_config`` that acts on a layer, and what ctref did with it."""

    scheme: str
    type: str
    location: str
    inverse: bool
    size: int
    """``s``: the side of the matrix (``head_dim``, or the layer's in/out features)."""
    head_dim: int | None
    disposition: str
    """:data:`FOLDED`, :data:`FUSED_AT_WRITE` or :data:`ATTENTION`."""
    tensor: str | None = None
    """The stored weight used (a tied copy may sit under another module); None if fused."""
    perm: str | None = None
    """The stored permutation used, if the scheme is randomized."""
    runtime_weight: torch.Tensor | None = field(default=None, compare=False, repr=False)
    """The ``(s, s)`` matrix the runtime multiplies by before normalization, in the stored dtype:
    the stored weight with ``perm`` applied to rows and columns, transposed for an inverse
    Hadamard; a random matrix as stored. None if fused at write."""

    @property
    def normalizer(self) -> torch.Tensor | None:
        """``√s`` (float64) for Hadamard kinds, which the runtime divides by; None otherwise."""
        if self.type not in _HADAMARD_TYPES:
            return None
        return torch.tensor(self.size, dtype=torch.float64).sqrt()

    @property
    def matrix(self) -> torch.Tensor:
        """The normalized ``(s, s)`` matrix ``T`` (float64): online, ``x -> x @ T`` per block."""
        if self.runtime_weight is None:
            raise ValueError(f"{self.scheme}_{self.location} was fused at write: no matrix stored")
        matrix = self.runtime_weight.to(torch.float64)
        normalizer = self.normalizer
        return matrix if normalizer is None else matrix / normalizer


def apply_online(value: torch.Tensor, transform: AppliedTransform) -> torch.Tensor:
    """What the runtime computes for an online transform: ``value @ T`` per block of the last
    dimension, in the stored matrix's dtype, returned in ``value``'s dtype.

    This is the only way to use a :data:`ATTENTION` transform (on query or key states).
    """
    weight = transform.runtime_weight
    if weight is None:
        raise ValueError(f"{transform.scheme}_{transform.location} was fused at write")
    result = _blockwise(value.to(weight.dtype), weight)
    normalizer = transform.normalizer
    if normalizer is not None:
        result = result / normalizer
    return result.to(value.dtype)


def effective_weight(
    name: str,
    weight: torch.Tensor,
    config: TransformConfig,
    tensor_of: TensorLookup,
    *,
    stored_names: Collection[str] = (),
    class_names: Sequence[str] = ("Linear",),
) -> tuple[torch.Tensor, list[AppliedTransform]]:
    """The float64 weight a Linear layer effectively applies, and the transforms that act on it.

    ``weight`` is the layer's dequantized stored weight ``(N, K)``; ``name`` its module name.
    Online transforms are folded in the order the runtime hooks run them: an ``input``
    transform ``y = (x @ T) @ Wᵀ`` gives ``W @ Tᵀ``, an ``output`` transform ``y @ T`` gives
    ``Tᵀ @ W`` (and changes the bias: see :func:`effective_bias`). Records come in config order
    (scheme, then ``apply`` entry); fused-at-write and attention-level transforms are reported,
    not applied. ``stored_names`` (every tensor name of the checkpoint) lets a tied matrix be
    found under another module; ``class_names`` are the module's class and ancestors' names for
    class-name targets.
    """
    if weight.dim() != 2:
        raise CTRefError(
            f"a Linear weight is 2-D (N, K), got shape {tuple(weight.shape)}",
            tensor=f"{name}.weight",
        )
    effective = weight.to(torch.float64)
    applied = []
    for entry in selected_entries(config, name, class_names):
        size = _linear_transform_size(tuple(weight.shape), entry)
        transform = _resolve(name, size, entry, tensor_of, stored_names)
        if transform.location == "input":
            effective = _blockwise(effective, transform.matrix.T)
        elif transform.location == "output":
            effective = _blockwise(effective.T, transform.matrix).T
        applied.append(transform)
    return effective, applied


def effective_bias(bias: torch.Tensor, applied: Sequence[AppliedTransform]) -> torch.Tensor:
    """The float64 bias that goes with :func:`effective_weight`: ``output`` transforms rotate the
    whole output, bias included (``b @ T``); ``input`` transforms leave it alone."""
    effective = bias.to(torch.float64)
    for transform in applied:
        if transform.disposition == FOLDED and transform.location == "output":
            effective = _blockwise(effective, transform.matrix)
    return effective


def attention_transforms(
    name: str,
    config: TransformConfig,
    tensor_of: TensorLookup,
    *,
    stored_names: Collection[str] = (),
    class_names: Sequence[str] = (),
) -> list[AppliedTransform]:
    """The ``q_attn``/``k_cache`` transforms of an attention module (e.g. SpinQuant's R3), with
    validated matrices of side ``head_dim``, for :func:`apply_online` on query/key states.

    Only these locations make sense on a module that is not a Linear; others raise.
    """
    transforms = []
    for entry in selected_entries(config, name, class_names):
        scheme_name, scheme, args = entry
        key = f"transform_config.config_groups.{scheme_name}"
        if args.location not in _ATTENTION_LOCATIONS:
            raise CTRefError(
                f"location {args.location!r} needs a Linear; {name} is taken as attention",
                key=f"{key}.apply",
            )
        if scheme.head_dim is None:
            raise CTRefError(
                f"required for location {args.location!r} on an attention module",
                key=f"{key}.head_dim",
            )
        transforms.append(_resolve(name, scheme.head_dim, entry, tensor_of, stored_names))
    return transforms


# ---------------------------------------------------------------------------------------------


def _blockwise(value: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``value @ block_diag(matrix, …, matrix)`` over the last dimension of ``value``."""
    size = matrix.shape[0]
    if value.shape[-1] == size:
        return value @ matrix
    if value.shape[-1] % size:
        raise ValueError(f"a {size}x{size} block does not tile a dimension of {value.shape[-1]}")
    return (value.unflatten(-1, (value.shape[-1] // size, size)) @ matrix).flatten(-2)


def _check_square(matrix: torch.Tensor, *, tensor: str, size: int | None = None) -> int:
    shape = tuple(matrix.shape)
    if len(shape) != 2 or shape[0] != shape[1] or (size is not None and shape[0] != size):
        expected = f"({size}, {size})" if size is not None else "square (s, s)"
        raise CTRefError(
            f"a transform matrix must have shape {expected}, got {shape}", tensor=tensor
        )
    if not matrix.dtype.is_floating_point:
        raise CTRefError(f"a transform matrix is floating point, got {matrix.dtype}", tensor=tensor)
    return shape[0]


def _linear_transform_size(weight_shape: tuple[int, int], entry: ApplyEntry) -> int:
    """``s``: ``head_dim`` if set (it must tile the dimension), else in or out features."""
    scheme_name, scheme, location = entry.scheme_name, entry.scheme, entry.args.location
    out_features, in_features = weight_shape
    dimension = in_features if location in _INPUT_SIDE_LOCATIONS else out_features
    if scheme.head_dim is None:
        return dimension
    if dimension % scheme.head_dim:
        raise CTRefError(
            f"head_dim {scheme.head_dim} must divide the {location} dimension {dimension}",
            key=f"transform_config.config_groups.{scheme_name}.head_dim",
        )
    return scheme.head_dim


def _resolve(
    name: str,
    size: int,
    entry: ApplyEntry,
    tensor_of: TensorLookup,
    stored_names: Collection[str],
) -> AppliedTransform:
    """The record of one transform on one module, with its validated runtime matrix if online."""
    scheme_name, scheme, args = entry
    record = AppliedTransform(
        scheme=scheme_name,
        type=scheme.type,
        location=args.location,
        inverse=args.inverse,
        size=size,
        head_dim=scheme.head_dim,
        disposition=FUSED_AT_WRITE,
    )
    if args.location in _OFFLINE_LOCATIONS:
        return record
    prefix, stored = _stored_matrix(name, size, entry, tensor_of, stored_names)
    weight_name = f"{prefix}.weight"
    _check_square(stored, tensor=weight_name, size=size)
    perm_name = f"{prefix}.perm"
    perm = tensor_of(perm_name)
    runtime_weight = stored
    if scheme.type in _HADAMARD_TYPES:
        check_hadamard(stored, tensor=weight_name)
        if scheme.type == "hadamard" and not torch.equal(
            stored.to(torch.float64), hadamard_matrix(size)
        ):
            raise CTRefError(
                "a 'hadamard' transform stores the Sylvester matrix (H[i,j] = (-1)^popcount(i&j))",
                tensor=weight_name,
            )
        if scheme.randomize:
            if perm is None:
                raise CTRefError(
                    "missing: a randomized Hadamard transform stores its perm", tensor=perm_name
                )
            check_permutation(perm, size, tensor=perm_name)
            runtime_weight = runtime_weight[perm][:, perm]
        if args.inverse:
            runtime_weight = runtime_weight.T
    elif not torch.isfinite(stored).all():
        raise CTRefError(
            "a random-matrix transform must be finite (no NaN or inf)", tensor=weight_name
        )
    if perm is not None and not (scheme.randomize and scheme.type in _HADAMARD_TYPES):
        raise CTRefError(
            f"unexpected: only a randomized Hadamard scheme stores a perm "
            f"(scheme {scheme_name!r} is {scheme.type}, randomize={scheme.randomize})",
            tensor=perm_name,
        )
    return dataclasses.replace(
        record,
        disposition=ATTENTION if args.location in _ATTENTION_LOCATIONS else FOLDED,
        tensor=weight_name,
        perm=perm_name if perm is not None else None,
        runtime_weight=runtime_weight,
    )


def _stored_matrix(
    name: str,
    size: int,
    entry: ApplyEntry,
    tensor_of: TensorLookup,
    stored_names: Collection[str],
) -> tuple[str, torch.Tensor]:
    """This module's stored matrix and the prefix it is stored under: its own
    ``<name>.<scheme>_<location>``, or else that of the tied copy the writer kept.

    One scheme shares a matrix among all its online transforms of the same size (random
    matrices: and the same ``inverse``), whatever the location, so the copy is any stored
    ``….<scheme>_<online location>.weight`` of shape ``(s, s)`` from a compatible ``apply``
    entry. Several such copies must be identical.
    """
    scheme_name, scheme, args = entry
    own = f"{name}.{scheme_name}_{args.location}"
    stored = tensor_of(f"{own}.weight")
    if stored is not None:
        return own, stored
    locations = {
        other.location
        for other in scheme.apply
        if other.location not in _OFFLINE_LOCATIONS
        and (scheme.type in _HADAMARD_TYPES or other.inverse == args.inverse)
    }
    suffixes = tuple(f".{scheme_name}_{location}.weight" for location in locations)
    copies = {}
    for candidate in sorted(stored_names):
        if candidate.endswith(suffixes):
            tensor = tensor_of(candidate)
            if tensor is not None and tuple(tensor.shape) == (size, size):
                copies[candidate] = tensor
    if not copies:
        raise CTRefError(
            f"missing: the online transform's matrix, and no tied copy of scheme "
            f"{scheme_name!r} with shape ({size}, {size}) is stored",
            tensor=f"{own}.weight",
        )
    first_name, first = next(iter(copies.items()))
    for other_name, other in copies.items():
        if not torch.equal(other, first):
            raise CTRefError(
                f"missing, and the tied copies that could stand in for it differ: "
                f"{first_name} and {other_name}",
                tensor=f"{own}.weight",
            )
    return first_name.removesuffix(".weight"), first
