"""`vllm-steer convert`: import a checkpoint written by the LM-Steer reference code,
torch.save([argparse.Namespace, {"projector1": P1, "projector2": P2}, step], path).

That is a pickle, so it is only ever opened here, at the user's explicit request
(`vllm-steer convert`); the steer file it becomes loads without unpickling."""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_steer.steer.file import SteerFile, SteerFileError
from vllm_steer.steer.fingerprint import embedding_fingerprint

# The reference's argument defaults (lm_steer/arguments.py), used where the Namespace is silent.
REFERENCE_EPSILON = 1e-3
REFERENCE_TRAINING_STEER = 0


def convert_reference_checkpoint(
    path: str | Path,
    dim_names: list[str] | None = None,
    output_embedding: torch.Tensor | None = None,
    base_model: str | None = None,
) -> SteerFile:
    """A SteerFile from a reference checkpoint. eps, the trained dim and the dummy (bias)
    dim come from the checkpoint's Namespace where present; `output_embedding` ([V, D], the
    model's lm_head weight) adds the fingerprint the reference never stored."""
    try:
        # weights_only=False: the checkpoint holds an argparse.Namespace. The user asked for this.
        payload = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:
        raise SteerFileError(f"{path}: cannot read as a torch checkpoint ({e})") from e
    if not (isinstance(payload, (list, tuple)) and len(payload) >= 2 and isinstance(payload[1], dict)):
        raise SteerFileError(f"{path}: expected [Namespace, {{'projector1', 'projector2'}}, step]")
    args, state = vars(payload[0]) if hasattr(payload[0], "__dict__") else {}, payload[1]
    adaptor = args.get("adaptor_class", "multiply")
    if adaptor != "multiply":
        raise SteerFileError(f"{path}: adaptor_class {adaptor!r} is not supported, only 'multiply' (the paper's)")
    if "projector1" not in state or "projector2" not in state:
        raise SteerFileError(f"{path}: the state dict has no projector1/projector2 (keys: {sorted(state)})")
    p1, p2 = state["projector1"].detach().float(), state["projector2"].detach().float()
    if p1.dim() != 3 or p1.shape != p2.shape:
        raise SteerFileError(f"{path}: projectors must both be [K, D, r], got {tuple(p1.shape)} and {tuple(p2.shape)}")
    num_dims = p1.shape[0]
    trained = int(args.get("training_steer", REFERENCE_TRAINING_STEER) or 0)
    dummy = args.get("dummy_steer")
    if dim_names is None:
        dim_names = [f"dim{k}" for k in range(num_dims)]
        dim_names[trained] = "steer"
        if dummy is not None:
            dim_names[int(dummy)] = "bias"
    if len(dim_names) != num_dims:
        raise SteerFileError(f"{path}: {len(dim_names)} dim names given for K={num_dims} dims")
    fingerprint = None
    if output_embedding is not None:
        if output_embedding.shape[1] != p1.shape[1]:
            raise SteerFileError(
                f"{path}: steer hidden size {p1.shape[1]} != the model's {output_embedding.shape[1]}"
            )
        fingerprint = embedding_fingerprint(output_embedding)
    recipe = {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool, type(None)))}
    recipe["step"] = payload[2] if len(payload) > 2 and isinstance(payload[2], int) else None
    return SteerFile.create(
        p1,
        p2,
        dim_names=dim_names,
        epsilon=float(args.get("epsilon", REFERENCE_EPSILON)),
        primary_dim=dim_names[trained],
        bias_dims={dim_names[int(dummy)]: 1.0} if dummy is not None else {},
        base_model=base_model or args.get("model_name"),
        fingerprint=fingerprint,
        recipe=recipe,
        source=f"converted from LM-Steer reference checkpoint {Path(path).name}",
    )
