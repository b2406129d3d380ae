"""Reading a checkpoint the LM-Steer reference code saved, without running code from it: the payload (unpickled
allowing only tensors, containers, numbers, strings and argparse.Namespace), its layout, its projectors, and what
its Namespace says, checked against the tensors. What the steer then means is decided in reference.py."""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from vllm_steer.steer.file import SteerFileError

TRAIN_LAYOUT = "train.py: [Namespace, projectors, step]"
OLD_TRAIN_LAYOUT = "train.py of the first release (bool dummy_steer): [Namespace, projectors, step]"
TRANSFER_LAYOUT = "steer_transfer.py: [None, projectors, step], no Namespace"


def load_reference_payload(path: str | Path, trust_pickle: bool = False) -> Any:
    """The object a reference checkpoint holds, every storage on the CPU. Without `trust_pickle`
    only tensors, containers, numbers, strings and argparse.Namespace are allowed (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference checkpoint not found: {path}")
    try:
        if trust_pickle:
            return torch.load(str(path), map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if unsupported is None:
            raise SteerFileError(f"{path}: cannot read as a torch checkpoint ({first_line(e)})") from e
        raise SteerFileError(
            f"{path}: the file holds a Python object of type {unsupported.group(1)}, which the LM-Steer reference "
            "scripts never save (they save tensors, an argparse.Namespace or None, and an int), so it was not "
            "unpickled: unpickling runs whatever code the file names. If you made this file yourself or trust "
            "its source, pass --trust-checkpoint to unpickle it fully."
        ) from e
    except Exception as e:
        raise SteerFileError(f"{path}: cannot read as a torch checkpoint ({first_line(e)})") from e


def unpack(path: Path, payload: Any) -> tuple[argparse.Namespace | None, dict, int | None]:
    if not (isinstance(payload, (list, tuple)) and len(payload) >= 2 and isinstance(payload[1], dict)):
        raise SteerFileError(
            f"{path}: expected the reference's [Namespace or None, {{'projector1', 'projector2'}}, step], "
            f"got {describe(payload)}"
        )
    namespace = payload[0]
    if namespace is not None and not isinstance(namespace, argparse.Namespace):
        raise SteerFileError(
            f"{path}: the first entry is {describe(namespace)}; the reference saves an argparse.Namespace "
            "(train.py) or None (steer_transfer.py) there"
        )
    step = payload[2] if len(payload) > 2 and isinstance(payload[2], int) else None
    return namespace, payload[1], step


def projectors(path: Path, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if "projector1" not in state or "projector2" not in state:
        other = [k for k in ("add_vec", "offset_vec") if k in state]
        hint = (f" ({other[0]} is the reference's '{other[0].split('_')[0]}' adaptor; only 'multiply', the "
                "paper's, is supported)") if other else ""
        raise SteerFileError(f"{path}: the state dict has no projector1/projector2 (keys: {sorted(state)}){hint}")
    p1, p2 = state["projector1"], state["projector2"]
    if not (isinstance(p1, torch.Tensor) and isinstance(p2, torch.Tensor)):
        raise SteerFileError(f"{path}: projector1/projector2 must be tensors, got {describe(p1)}, {describe(p2)}")
    if p1.dim() != 3 or p1.shape != p2.shape:
        raise SteerFileError(f"{path}: projectors must both be [K, D, r], got {tuple(p1.shape)} and {tuple(p2.shape)}")
    return p1.detach().float().contiguous(), p2.detach().float().contiguous()


def is_first_release(args: dict) -> bool:
    """The first public release: a bool dummy_steer (appended last) and pos_neg_independent."""
    return isinstance(args.get("dummy_steer"), bool) or "pos_neg_independent" in args


def check_adaptor(path: Path, args: dict | None) -> None:
    if args is None:
        return
    adaptor = args.get("adaptor_class", "multiply")
    if adaptor != "multiply":
        raise SteerFileError(f"{path}: adaptor_class {adaptor!r} is not supported, only 'multiply' (the paper's)")
    component = args.get("adapted_component", "final_layer")
    if component != "final_layer":
        raise SteerFileError(
            f"{path}: adapted_component {component!r}: this steer was trained on the model's input embedding, "
            "not on the final hidden state that feeds the LM head, which is the only place vllm-steer applies "
            "a steer ('final_layer'); serving it there would not be the steer that was trained"
        )


def check_shapes(path: Path, args: dict | None, num_dims: int, rank: int) -> None:
    for key, actual in (("num_steers", num_dims), ("rank", rank)):
        said = (args or {}).get(key)
        if isinstance(said, int) and not isinstance(said, bool) and said != actual:
            raise SteerFileError(
                f"{path}: the Namespace says {key}={said} but the projectors have {actual} "
                f"(shape [K, D, r]): the Namespace does not describe these tensors, so nothing in it can be trusted"
            )


def describe(obj: Any) -> str:
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
