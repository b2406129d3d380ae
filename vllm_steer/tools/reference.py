"""`vllm-steer convert`: turn a checkpoint written by the LM-Steer reference code into a steer file, reading
what the checkpoint says (reference_checkpoint.py reads it) and refusing to guess what it does not.

The reference's scripts save two layouts with `torch.save`:

- `experiments/training/train.py`: `[argparse.Namespace, {"projector1", "projector2"}, step]`; the
  Namespace holds every command-line field (eps, the trained dim `training_steer`, the dummy dim
  `dummy_steer`, ...). The first public release had a bool `dummy_steer` (a ones column appended
  last) and `pos_neg_independent` (the label split into a positive and a negative column).
- `experiments/steer_transfer.py`: `[None, {"projector1", "projector2"}, step]`: no Namespace, so
  eps and which dim is the dummy are not in the file at all.

Both are pickles. They are read with `weights_only=True`, allowing `argparse.Namespace` and nothing
else, so converting a reference file runs no code from it; anything else is refused unless the user
says the file is trusted. Storages saved on a GPU (`cuda:0`) are mapped to the CPU."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_steer.steer.file import SteerFile, SteerFileError
from vllm_steer.steer.fingerprint import embedding_fingerprint

from .reference_checkpoint import (
    OLD_TRAIN_LAYOUT,
    TRAIN_LAYOUT,
    TRANSFER_LAYOUT,
    check_adaptor,
    check_shapes,
    is_first_release,
    load_reference_payload,
    projectors,
    unpack,
)

# The reference's argument defaults (lm_steer/arguments.py) and the README recipes' layout
# (train `--num_steers 2 --dummy_steer 1`, generate `--steer_values v 1`): what --assume-defaults assumes.
REFERENCE_EPSILON = 1e-3
REFERENCE_PRIMARY_DIM = 0
REFERENCE_DUMMY_DIM = 1
REFERENCE_DUMMY_VALUE = 1.0

ASSUMED_RECIPE = (
    "the reference README's recipes train with `--num_steers 2 --dummy_steer 1` and eps 1e-3 (the default) "
    "and generate with `--steer_values v 1`: dim 0 is the trained steer, dim 1 a dummy held at 1; "
    "steer_transfer.py keeps its source's dims and eps and records neither"
)


@dataclass(frozen=True)
class ConvertOptions:
    """What the user says on the command line; each overrides the checkpoint. A DIM is an index
    (0..K-1) or one of `dim_names`. `bias_dims={}` states "no bias dims"; None leaves it to the file."""

    epsilon: float | None = None
    primary_dim: str | None = None
    bias_dims: dict[str, float] | None = None
    dim_names: list[str] | None = None
    assume_defaults: bool = False
    trust_pickle: bool = False


@dataclass(frozen=True)
class Setting:
    """One setting of the converted steer and where it came from."""

    name: str
    value: Any
    shown: str
    origin: str


@dataclass
class Conversion:
    """The converted steer, the checkpoint's layout, each setting with its origin, and notes
    (command-line values that differ from the Namespace, warnings)."""

    steer: SteerFile
    layout: str
    step: int | None
    settings: list[Setting]
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        """What was read and what was assumed, one line each."""
        h = self.steer.header
        lines = [f"read: {self.layout}; step {self.step}; K={h.num_dims}, D={h.hidden_size}, r={h.rank}"]
        width = max(len(s.name) for s in self.settings)
        lines += [f"  {s.name:<{width}}  {s.shown:<24} {s.origin}" for s in self.settings]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def convert_reference_checkpoint(
    path: str | Path,
    options: ConvertOptions | None = None,
    output_embedding: torch.Tensor | None = None,
    base_model: str | None = None,
) -> Conversion:
    """Convert a reference checkpoint. eps, the primary dim and the bias dims come from `options`
    where given, else from the checkpoint's Namespace, else (with `options.assume_defaults`) from
    the reference README's recipe; anything still unknown is refused with what to pass.
    `output_embedding` ([V, D], the model's LM-head weight) adds the fingerprint the reference never stored."""
    options = options or ConvertOptions()
    path = Path(path)
    payload = load_reference_payload(path, options.trust_pickle)
    namespace, state, step = unpack(path, payload)
    args = vars(namespace) if namespace is not None else None
    check_adaptor(path, args)
    p1, p2 = projectors(path, state)
    num_dims, hidden, rank = p1.shape
    check_shapes(path, args, num_dims, rank)
    layout = TRANSFER_LAYOUT if args is None else OLD_TRAIN_LAYOUT if is_first_release(args) else TRAIN_LAYOUT

    resolver = _Resolver(path, options, args, num_dims)
    epsilon = resolver.epsilon()
    bias = resolver.bias_dims()
    primary = resolver.primary_dim(bias)
    resolver.refuse_if_missing()

    names = _dim_names(path, options.dim_names, num_dims, primary, bias)
    fingerprint = None
    if output_embedding is not None:
        if output_embedding.shape[1] != hidden:
            raise SteerFileError(
                f"{path}: the steer's hidden size D={hidden} differs from the model's {output_embedding.shape[1]}: "
                "this checkpoint was trained for another model (the reference's model_name is "
                f"{(args or {}).get('model_name', 'not recorded')!r})"
            )
        fingerprint = embedding_fingerprint(output_embedding)

    settings = [
        Setting("epsilon", epsilon[0], f"{epsilon[0]:g}", epsilon[1]),
        Setting("primary dim", primary[0], f"{primary[0]} {names[primary[0]]!r}", primary[1]),
        Setting("bias dims", bias[0], ", ".join(f"{k} {names[k]!r} = {v:g}" for k, v in bias[0].items()) or "none",
                bias[1]),
    ]
    recipe = {
        "converted_from": f"LM-Steer reference checkpoint {path.name}",
        "checkpoint_layout": layout,
        "step": step,
        "transferred": args is None,
        "settings": {s.name.replace(" ", "_"): {"value": s.shown, "origin": s.origin} for s in settings},
        "reference_args": None if args is None else {k: v for k, v in args.items() if _json_scalar_or_list(v)},
    }
    if resolver.notes:
        recipe["notes"] = resolver.notes
    short = "; ".join(f"{s.name} {s.shown} <- {s.origin}" for s in settings)
    steer = SteerFile.create(
        p1,
        p2,
        dim_names=names,
        epsilon=epsilon[0],
        primary_dim=names[primary[0]],
        bias_dims={names[k]: v for k, v in bias[0].items()},
        base_model=base_model or (args or {}).get("model_name"),
        fingerprint=fingerprint,
        recipe=recipe,
        source=f"converted from LM-Steer reference checkpoint {path.name} ({layout}): {short}",
    )
    return Conversion(steer, layout, step, settings, list(resolver.notes))


def head_bias_warning(model: str, bias: torch.Tensor | None) -> str | None:
    """The warning for a model whose LM head has a bias (GPT-J): None when it has none."""
    if bias is None or not bool(bias.abs().max() > 0):
        return None
    return (
        f"{model}'s LM head has a bias (max |b| = {bias.abs().max().item():.3g}). The reference's wrappers drop it "
        "(their logits are h' E^T, steered or not); vLLM adds it (h' E^T + b), as the model itself does. "
        "So the served logprobs differ from the reference's outputs by the bias term at every steer value, "
        "0 and unsteered included: the served model is the real model plus the steer, the reference's is the "
        "model without its head bias plus the steer (a steer trained without b was fitted to the latter)."
    )


# ---------------------------------------------------------------------------- the three settings


class _Resolver:
    """eps, the bias dims and the primary dim, each as (value, origin); records what is missing."""

    def __init__(self, path: Path, options: ConvertOptions, args: dict | None, num_dims: int) -> None:
        self.path, self.options, self.args, self.k = path, options, args, num_dims
        self.missing: list[str] = []
        self.notes: list[str] = []

    def index(self, dim: str, flag: str) -> int:
        names = self.options.dim_names or []
        if dim in names:
            return names.index(dim)
        if re.fullmatch(r"\d+", dim) and int(dim) < self.k:
            return int(dim)
        choices = f"an index 0..{self.k - 1}" + (f" or one of --dim-names {names}" if names else
                                                  " (or name the dims with --dim-names and use a name)")
        raise SteerFileError(f"{self.path}: {flag} {dim!r} is not a dim of this K={self.k} checkpoint; give {choices}")

    def _namespace_differs(self, what: str, field: str, said: Any, given: Any) -> None:
        if said != given:
            self.notes.append(f"{what}: the Namespace says {field}={said!r}; the command line's {given!r} is used")

    def epsilon(self) -> tuple[float, str]:
        args = self.args or {}
        said = args.get("epsilon")
        if said is not None and not (isinstance(said, (int, float)) and math.isfinite(said) and said > 0):
            raise SteerFileError(f"{self.path}: the Namespace's epsilon {said!r} is not a positive number")
        if self.options.epsilon is not None:
            if said is not None:
                self._namespace_differs("epsilon", "epsilon", float(said), float(self.options.epsilon))
            return float(self.options.epsilon), "given on the command line (--epsilon)"
        if said is not None:
            return float(said), "read from the Namespace (epsilon)"
        if self.options.assume_defaults:
            return REFERENCE_EPSILON, "assumed: the reference's default eps (--assume-defaults)"
        self.missing.append("epsilon")
        return REFERENCE_EPSILON, ""

    def _namespace_bias(self) -> tuple[dict[int, float], str] | None:
        args = self.args
        if args is None or "dummy_steer" not in args:
            return None
        dummy = args["dummy_steer"]
        if isinstance(dummy, bool):  # first release: a ones column appended after the label column(s)
            if not dummy:
                return {}, "read from the Namespace (dummy_steer False: no dummy dim)"
            index = 2 if args.get("pos_neg_independent") else 1
            return {index: REFERENCE_DUMMY_VALUE}, (
                f"read from the Namespace (dummy_steer True, first-release format: the ones column comes after "
                f"the {'two label columns (pos_neg_independent)' if index == 2 else 'label column'})")
        if dummy is None:
            return {}, "read from the Namespace (dummy_steer None: no dummy dim)"
        if not isinstance(dummy, int) or not 0 <= dummy < self.k:
            raise SteerFileError(
                f"{self.path}: the Namespace's dummy_steer {dummy!r} is not a dim index 0..{self.k - 1}")
        return {dummy: REFERENCE_DUMMY_VALUE}, f"read from the Namespace (dummy_steer {dummy}, held at 1)"

    def bias_dims(self) -> tuple[dict[int, float], str]:
        said = self._namespace_bias()
        if self.options.bias_dims is not None:
            given = {self.index(d, "--bias-dim"): float(v) for d, v in self.options.bias_dims.items()}
            for d, v in given.items():
                if not math.isfinite(v):
                    raise SteerFileError(f"{self.path}: --bias-dim {d}={v}: the value must be finite")
            if said is not None:
                self._namespace_differs("bias dims", "dummy_steer", said[0], given)
            flag = "--bias-dim" if given else "--no-bias-dim"
            return given, f"given on the command line ({flag})"
        if said is not None:
            return said
        if self.options.assume_defaults:
            if self.k == 2:
                return {REFERENCE_DUMMY_DIM: REFERENCE_DUMMY_VALUE}, (
                    "assumed: dim 1 is the reference's dummy steer, held at 1 (--assume-defaults, K=2)")
            return {}, (f"assumed: none (--assume-defaults; the README's dummy-dim layout needs K=2, "
                        f"this has K={self.k})")
        self.missing.append("bias dims")
        return {}, ""

    def primary_dim(self, bias: tuple[dict[int, float], str]) -> tuple[int, str]:
        args = self.args or {}
        bias_dims = bias[0]
        pos_neg = bool(args.get("pos_neg_independent"))
        if self.options.primary_dim is not None:
            given = self.index(self.options.primary_dim, "--primary-dim")
            if given in bias_dims:
                raise SteerFileError(
                    f"{self.path}: --primary-dim {self.options.primary_dim} is dim {given}, which is also a bias dim "
                    f"({bias[1]}); a scalar request value cannot set a dim that is held fixed")
            if "training_steer" in args:
                self._namespace_differs("primary dim", "training_steer", args["training_steer"], given)
            return given, "given on the command line (--primary-dim)"
        if pos_neg:
            raise SteerFileError(
                f"{self.path}: this checkpoint was trained with pos_neg_independent (first-release format): dim 0 "
                "is 1 for positive examples and dim 1 is 1 for negative ones, so no single dim takes a signed "
                "value. Choose the dim a scalar request sets with --primary-dim 0 (positive) or --primary-dim 1 "
                "(negative), and send the other as a full list, e.g. {\"steer_x\": [0, 5, 1]}.")
        if "training_steer" in args or (self.args is not None and is_first_release(args)):
            trained = args.get("training_steer", 0)
            if not isinstance(trained, int) or isinstance(trained, bool) or not 0 <= trained < self.k:
                raise SteerFileError(
                    f"{self.path}: the Namespace's training_steer {trained!r} is not a dim index 0..{self.k - 1}")
            if trained in bias_dims:
                raise SteerFileError(
                    f"{self.path}: the trained dim {trained} is also the dummy dim ({bias[1]}): the reference then "
                    "overwrote every label with 1, so this steer was never trained on a label. Give --primary-dim "
                    "and --bias-dim yourself if you know better.")
            if "training_steer" in args:
                return trained, f"read from the Namespace (training_steer {trained})"
            return trained, "read from the Namespace (first-release format: the label is column 0)"
        free = [k for k in range(self.k) if k not in bias_dims]
        if len(free) == 1 and "bias dims" not in self.missing and not bias[1].startswith("assumed"):
            return free[0], "the only dim that is not a bias dim"
        if self.options.assume_defaults and REFERENCE_PRIMARY_DIM not in bias_dims:
            return REFERENCE_PRIMARY_DIM, "assumed: dim 0 is the trained steer (--assume-defaults)"
        self.missing.append("primary dim")
        return (free or [0])[0], ""

    def refuse_if_missing(self) -> None:
        if not self.missing:
            return
        why = ("it has no Namespace (steer_transfer.py saves [None, projectors, step])" if self.args is None
               else "its Namespace has no " + " or ".join(
                   {"epsilon": "epsilon", "bias dims": "dummy_steer", "primary dim": "training_steer"}[m]
                   for m in self.missing))
        k2 = self.k == 2
        assumed = (f"eps {REFERENCE_EPSILON:g}, primary dim {REFERENCE_PRIMARY_DIM}, "
                   + (f"dim {REFERENCE_DUMMY_DIM} held at {REFERENCE_DUMMY_VALUE:g}" if k2 else
                      f"no bias dims (this checkpoint has K={self.k}, not the README's 2)"))
        raise SteerFileError(
            f"{self.path}: this checkpoint does not say its {', '.join(self.missing)}: {why}. Guessing wrong "
            "changes every steered logit (a missing dummy dim alone moves logprobs by up to 0.65 nats per token), "
            "so say it:\n"
            "  --epsilon EPS          the eps the steer was trained with\n"
            "  --primary-dim DIM      the dim a scalar request value sets\n"
            "  --bias-dim DIM=VALUE   a dim held at VALUE whenever the steer is used (repeatable); "
            "--no-bias-dim for none\n"
            f"  (DIM: an index 0..{self.k - 1}, or a name given with --dim-names)\n"
            f"or pass --assume-defaults to assume {assumed}: {ASSUMED_RECIPE}. "
            "The choice is printed and recorded in the file's recipe and source."
        )


def _dim_names(path: Path, given: list[str] | None, num_dims: int, primary: tuple[int, str],
               bias: tuple[dict[int, float], str]) -> list[str]:
    if given is not None:
        if len(given) != num_dims:
            raise SteerFileError(f"{path}: {len(given)} dim names given ({given}) for a K={num_dims} checkpoint")
        return list(given)
    names = [f"dim{k}" for k in range(num_dims)]
    names[primary[0]] = "steer"
    for k in bias[0]:
        names[k] = "bias" if len(bias[0]) == 1 else f"bias{k}"
    return names


def _json_scalar_or_list(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, (str, int, float, bool, type(None))) for v in value)
    return isinstance(value, (str, int, float, bool, type(None)))


