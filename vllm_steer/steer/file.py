"""The steer file: LM-Steer projectors in safetensors, with metadata that makes the file
self-describing and safe to load (no pickle, ever).

A steer holds K named dimensions. Dimension k is the pair projector1[k], projector2[k]
(each [D, r]); a request's value s_k scales W_k = projector1[k] @ projector2[k]^T and
the hidden state h that feeds the LM head becomes h + eps * sum_k s_k (h @ P1_k) @ P2_k^T.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

FORMAT = "vllm-steer/1"
TENSOR_KEYS = ("projector1", "projector2")
# safetensors itself refuses headers over 100 MB; a steer's is a few KiB.
MAX_HEADER_BYTES = 100_000_000
NOT_SAFETENSORS = "it is not a safetensors file"


class SteerFileError(ValueError):
    """A steer file is malformed, or does not fit the model it is loaded onto. The message says it all, for the
    operator; `check` names only which check failed, in words that quote nothing of the file: what a server
    tells a client about a file it read."""

    def __init__(self, message: str, check: str = "invalid steer metadata") -> None:
        super().__init__(message)
        self.check = check


@dataclass(frozen=True)
class SteerHeader:
    """Everything about a steer except its weights: what the front end needs to validate
    requests, and what `vllm-steer inspect` prints."""

    dim_names: tuple[str, ...]
    epsilon: float
    hidden_size: int
    rank: int
    primary_dim: str
    bias_dims: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None
    fingerprint: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None
    source: str | None = None
    max_abs_value: float | None = None  # the largest |value| the maker vouches for; servers enforce it

    @property
    def num_dims(self) -> int:
        return len(self.dim_names)

    @property
    def primary_index(self) -> int:
        return self.dim_names.index(self.primary_dim)

    def dim_index(self, dim: str | None = None) -> int:
        """The index of dim `dim` (default: the primary dim); a ValueError names the dims there are."""
        name = dim or self.primary_dim
        if name not in self.dim_names:
            raise ValueError(f"no dim {name!r} in this steer (dims: {list(self.dim_names)})")
        return self.dim_names.index(name)

    def __post_init__(self) -> None:
        names = self.dim_names
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise SteerFileError(f"dim_names must be distinct non-empty strings, got {list(names)}")
        if self.primary_dim not in names:
            raise SteerFileError(f"primary_dim {self.primary_dim!r} is not one of {list(names)}")
        if self.primary_dim in self.bias_dims:
            raise SteerFileError(f"primary_dim {self.primary_dim!r} cannot also be a bias dim")
        for name, value in self.bias_dims.items():
            if name not in names:
                raise SteerFileError(f"bias dim {name!r} is not one of {list(names)}")
            if not math.isfinite(value):
                raise SteerFileError(f"bias dim {name!r} has a non-finite value {value}")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise SteerFileError(f"epsilon must be a positive finite number, got {self.epsilon}")
        if self.max_abs_value is not None and not (math.isfinite(self.max_abs_value) and self.max_abs_value > 0):
            raise SteerFileError(f"max_abs_value must be a positive finite number, got {self.max_abs_value}")
        if self.hidden_size <= 0 or self.rank <= 0:
            raise SteerFileError(f"hidden_size and rank must be positive, got {self.hidden_size}, {self.rank}")
        if self.fingerprint is not None and (problem := _fingerprint_problem(self.fingerprint, self.hidden_size)):
            raise SteerFileError(f"the embedding fingerprint is malformed: {problem}",
                                 "its embedding fingerprint is malformed")

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT,
            "dim_names": json.dumps(list(self.dim_names)),
            "primary_dim": self.primary_dim,
            "bias_dims": json.dumps(self.bias_dims),
            "epsilon": repr(float(self.epsilon)),
            "hidden_size": str(self.hidden_size),
            "rank": str(self.rank),
            "num_dims": str(self.num_dims),
        }
        optional = {"base_model": self.base_model, "source": self.source,
                    "max_abs_value": None if self.max_abs_value is None else repr(float(self.max_abs_value))}
        meta.update({k: v for k, v in optional.items() if v is not None})
        for key in ("fingerprint", "recipe"):
            if getattr(self, key) is not None:
                meta[key] = json.dumps(getattr(self, key))
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str] | None, where: str = "steer file") -> SteerHeader:
        meta = meta or {}
        if meta.get("format") != FORMAT:
            raise SteerFileError(
                f"{where}: not a vllm-steer file (metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}); "
                "import a reference checkpoint with `vllm-steer convert`", "it has no vllm-steer metadata")
        try:
            header = cls(
                dim_names=tuple(json.loads(meta["dim_names"])),
                epsilon=float(meta["epsilon"]),
                hidden_size=int(meta["hidden_size"]),
                rank=int(meta["rank"]),
                primary_dim=meta["primary_dim"],
                bias_dims={k: float(v) for k, v in json.loads(meta.get("bias_dims", "{}")).items()},
                base_model=meta.get("base_model"),
                fingerprint=json.loads(meta["fingerprint"]) if "fingerprint" in meta else None,
                recipe=json.loads(meta["recipe"]) if "recipe" in meta else None,
                source=meta.get("source"),
                max_abs_value=float(meta["max_abs_value"]) if "max_abs_value" in meta else None,
            )
            num_dims = int(meta.get("num_dims", header.num_dims))
        except SteerFileError as e:
            raise SteerFileError(f"{where}: {e}", e.check) from e
        except (KeyError, ValueError, TypeError, AttributeError, OverflowError) as e:
            raise SteerFileError(f"{where}: malformed metadata ({type(e).__name__}: {e})") from e
        if num_dims != header.num_dims:
            raise SteerFileError(f"{where}: num_dims {num_dims} != len(dim_names) {header.num_dims}")
        return header


@dataclass(frozen=True)
class SteerFile:
    """A steer: its header and projector1/projector2, each [K, D, r]."""

    header: SteerHeader
    projector1: torch.Tensor
    projector2: torch.Tensor

    def __post_init__(self) -> None:
        h = self.header
        expected = (h.num_dims, h.hidden_size, h.rank)
        for name in TENSOR_KEYS:
            tensor = getattr(self, name)
            if tuple(tensor.shape) != expected:
                raise SteerFileError(f"{name} has shape {tuple(tensor.shape)}, expected [K, D, r] = {list(expected)}",
                                     "the projectors' shapes do not match its metadata")
            if not tensor.is_floating_point():
                raise SteerFileError(f"{name} must be a floating-point tensor, got {tensor.dtype}",
                                     "the projectors are not floating point")
            if not torch.isfinite(tensor).all():
                raise SteerFileError(f"{name} contains NaN or infinite values",
                                     "the projectors hold NaN or infinite values")

    @classmethod
    def create(
        cls,
        projector1: torch.Tensor,
        projector2: torch.Tensor,
        *,
        dim_names: list[str] | tuple[str, ...],
        epsilon: float = 1e-3,
        primary_dim: str | None = None,
        bias_dims: dict[str, float] | None = None,
        **header_fields: Any,
    ) -> SteerFile:
        """Build a steer from projectors shaped [K, D, r]; the primary dim defaults to the
        first dim that is not a bias dim."""
        bias_dims = dict(bias_dims or {})
        if primary_dim is None:
            free = [n for n in dim_names if n not in bias_dims]
            if not free:
                raise SteerFileError("a steer needs at least one dim that is not a bias dim")
            primary_dim = free[0]
        header = SteerHeader(
            dim_names=tuple(dim_names),
            epsilon=float(epsilon),
            hidden_size=int(projector1.shape[1]),
            rank=int(projector1.shape[2]),
            primary_dim=primary_dim,
            bias_dims=bias_dims,
            **header_fields,
        )
        return cls(header, projector1, projector2)

    @property
    def nbytes(self) -> int:
        """The bytes of its projectors (what its file holds, bar the header)."""
        return sum(t.numel() * t.element_size() for t in (self.projector1, self.projector2))

    def with_header(self, **changes: Any) -> SteerFile:
        return SteerFile(replace(self.header, **changes), self.projector1, self.projector2)

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        tensors = {
            name: getattr(self, name).detach().to("cpu", dtype or getattr(self, name).dtype).contiguous()
            for name in TENSOR_KEYS
        }
        save_file(tensors, str(path), metadata=self.header.to_metadata())

    @classmethod
    def load(cls, path: str | Path) -> SteerFile:
        """Read and check a steer file. Never unpickles."""
        header = read_header(path)
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in TENSOR_KEYS if k in f.keys()}
        return cls._checked(header, tensors, str(path))

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "steer bytes") -> SteerFile:
        """A steer from the bytes of a steer file (as sent to the workers of a server on several
        nodes), with the same checks as `load`; `where` names the source in error messages.
        Never unpickles: the safetensors header is JSON and the tensors are raw buffers."""
        header = SteerHeader.from_metadata(safetensors_metadata(data, where), where=where)
        try:
            tensors = safetensors_load(bytes(data))
        except Exception as e:  # safetensors raises its own error types for garbage input
            raise SteerFileError(f"{where}: not a readable safetensors file ({e})", NOT_SAFETENSORS) from e
        return cls._checked(header, {k: tensors[k] for k in TENSOR_KEYS if k in tensors}, where)

    @classmethod
    def _checked(cls, header: SteerHeader, tensors: dict[str, torch.Tensor], where: str) -> SteerFile:
        missing = [k for k in TENSOR_KEYS if k not in tensors]
        if missing:
            raise SteerFileError(f"{where}: missing tensors {missing}", "the projector tensors are missing")
        try:
            return cls(header, **tensors)
        except SteerFileError as e:
            raise SteerFileError(f"{where}: {e}", e.check) from e


def _fingerprint_problem(fingerprint: object, hidden_size: int) -> str | None:
    """What is wrong with a fingerprint's structure (as `fingerprint.embedding_fingerprint` writes it), or None."""
    if not isinstance(fingerprint, dict):
        return f"a {type(fingerprint).__name__}, not an object"
    for key in ("vocab_size", "hidden_size"):
        value = fingerprint.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            return f"{key} must be a positive integer"
    if fingerprint["hidden_size"] != hidden_size:
        return "its hidden_size is not the steer's"
    lists = [fingerprint.get(key) for key in ("rows", "norms", "sums")]
    if not all(isinstance(x, list) for x in lists) or len({len(x) for x in lists}) != 1:
        return "rows, norms and sums must be lists of one length"
    rows, norms, sums = lists
    if not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < fingerprint["vocab_size"] for r in rows):
        return "rows must be indices into the vocabulary"
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in norms + sums):
        return "norms and sums must be finite numbers"
    return None


def safetensors_metadata(data: bytes, where: str = "steer bytes") -> dict[str, str] | None:
    """The string metadata of a safetensors file held in memory: the file opens with the length
    of its JSON header (8 bytes, little-endian), then that JSON, whose "__metadata__" entry it is."""
    if len(data) < 8:
        raise SteerFileError(f"{where}: not a readable safetensors file ({len(data)} bytes)", NOT_SAFETENSORS)
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8 or length > MAX_HEADER_BYTES:
        raise SteerFileError(f"{where}: not a readable safetensors file (header length {length} for "
                             f"{len(data)} bytes)", NOT_SAFETENSORS)
    try:
        header = json.loads(bytes(data[8: 8 + length]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SteerFileError(f"{where}: not a readable safetensors file (header: {e})", NOT_SAFETENSORS) from e
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise SteerFileError(f"{where}: not a readable safetensors file (its metadata is not a string map)",
                             NOT_SAFETENSORS)
    return metadata


def read_header(path: str | Path) -> SteerHeader:
    """The header alone (reads the safetensors JSON header, not the weights)."""
    path = Path(path)
    if not path.is_file():
        raise SteerFileError(f"steer file not found: {path}", "no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
    except SteerFileError:
        raise
    except Exception as e:  # safetensors raises its own error types for garbage input
        raise SteerFileError(f"{path}: not a readable safetensors file ({e})", NOT_SAFETENSORS) from e
    return SteerHeader.from_metadata(meta, where=str(path))
