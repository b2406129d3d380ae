"""Checkpoints written the way the LM-Steer reference's scripts write them (layouts, Namespace field
names and types, tensor kinds, CUDA storage tags), for the convert tests, and the three converted ones the
session's steer server serves; no reference code is used."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.serialization

# lm_steer/arguments.py at the reference's HEAD: every field parse_args() returns, with its default.
HEAD_ARGUMENTS = dict(
    model_name="EleutherAI/gpt-neo-2.7B", adaptor_class="multiply", adapted_component="final_layer",
    epsilon=1e-3, init_var=1e-2, rank=1000, num_steers=10, temperature=1, cuda=False, low_resource_mode=False,
    data_dir=None, dataset_name=None, eval_file=None, output_file=None, data_size=None, split=None,
    regularization=0, optimizer="Adam", lr=1e-3, gamma_mean=0.99, n_steps=10000, seed=0, ckpt_name=None,
    max_length=256, batch_size=32, log_step=500, subset=None, dummy_steer=None, training_steer=0,
    eval_size=None, steer_values=None, verbose=False, top_p=1, transfer_from=None,
)
# The README's training recipe (sentiment, section 2.2): the Namespace train.py then pickles.
README_RECIPE = dict(
    model_name="gpt2-large", cuda=True, adaptor_class="multiply", num_steers=2, dummy_steer=1, rank=1000,
    batch_size=32, max_length=256, n_steps=1000, lr=1e-2, regularization=1e-6, epsilon=1e-3,
    dataset_name="sentiment-sst5", ckpt_name="logs/sentiment/checkpoint.pt",
)
# The first public release's arguments (bool dummy_steer, pos_neg_independent, no training_steer).
FIRST_RELEASE_ARGUMENTS = dict(
    model_name="EleutherAI/gpt-neo-2.7B", adaptor_class="multiply", adapted_component="final_layer",
    epsilon=1e-3, init_var=1e-2, rank=10, num_steers=50, temperature=1, dummy_steer=False, data_dir=None,
    dataset_name=None, data_file="data/gun_control.txt", eval_file=None, regularization=0, output_file=None,
    input_file=None, data_size=None, optimizer="Adam", lr=1e-3, gamma_mean=0.99, n_steps=10000, seed=0,
    cuda=False, prompt_only=False, low_resource_mode=False, ckpt_name=None, log_dir=None, split=None,
    max_length=256, eval_size=None, batch_size=32, log_step=500, subset=None, eval_only=False, steer_values=None,
    verbose=False, transfer_from=None, top_k=None, top_p=1, pos_neg_independent=False, alpha=0, beta=0, theta=0,
    tau=0, api_key=None,
)


def head_namespace(**changes) -> argparse.Namespace:
    """The Namespace train.py (HEAD) saves for the README's recipe, with `changes` on top."""
    return argparse.Namespace(**{**HEAD_ARGUMENTS, **README_RECIPE, **changes})


def first_release_namespace(**changes) -> argparse.Namespace:
    return argparse.Namespace(**{**FIRST_RELEASE_ARGUMENTS, **changes})


@contextlib.contextmanager
def storages_tagged(location: str = "cuda:0") -> Iterator[None]:
    """While active, torch.save records every storage's location as `location`, as a checkpoint
    saved from GPU training does (torch.save asks torch.serialization.location_tag per storage)."""
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: location
    try:
        yield
    finally:
        torch.serialization.location_tag = original


def _save(obj, path: Path, cuda: bool) -> None:
    with storages_tagged("cuda:0") if cuda else contextlib.nullcontext():
        torch.save(obj, str(path))


def write_train_checkpoint(path: Path, p1: torch.Tensor, p2: torch.Tensor, namespace: argparse.Namespace | None,
                           step: int = 1000, cuda: bool = True) -> None:
    """train.py's `torch.save([args, model.state_dict(), step])`: the state dict holds the adaptor's
    nn.Parameter objects themselves (requires_grad), on cuda:0 when trained with --cuda."""
    state = {"projector1": torch.nn.Parameter(p1.clone()), "projector2": torch.nn.Parameter(p2.clone())}
    _save([namespace, state, step], path, cuda)


def write_transfer_checkpoint(path: Path, p1_source: torch.Tensor, p2_source: torch.Tensor, hidden_to: int,
                              step: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """steer_transfer.py's `torch.save([None, {projector_i: B @ P_i}, source step])`: B [D_to, D_from]
    a fitted map with unit rows, the products non-leaf tensors with requires_grad, on cuda:0 (the
    script hard-codes it). Returns the saved projectors' values."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(hidden_to, p1_source.shape[1], generator=g).requires_grad_(True)
    b = raw / raw.norm(dim=1, keepdim=True)
    saved = {"projector1": b.matmul(p1_source), "projector2": b.matmul(p2_source)}
    assert saved["projector1"].grad_fn is not None and saved["projector1"].requires_grad
    _save([None, saved, step], path, cuda=True)
    return saved["projector1"].detach().clone(), saved["projector2"].detach().clone()


def _randn(*shape: int, seed: int, sigma: float) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * sigma


def converted_reference_steers(folder: Path, model_dir: Path, hidden_size: int) -> tuple[dict[str, str], dict]:
    """Three reference checkpoints written in `folder` and converted by `vllm-steer convert` for the model in
    `model_dir`: ({name: served file}, {name: the formula's SteerFile built from the checkpoint's own tensors and
    the eps the reference trained with}). Sigmas give a 20% move of h at v=5, as the suite's steers."""
    from vllm_steer import SteerFile
    from vllm_steer.cli import main

    expected, served = {}, {}
    # train.py, README recipe (K=2, rank 1000, dummy dim 1, eps 1e-3), trained with --cuda.
    p1, p2 = _randn(2, hidden_size, 1000, seed=11, sigma=0.23), _randn(2, hidden_size, 1000, seed=12, sigma=0.23)
    write_train_checkpoint(folder / "train.pt", p1, p2, head_namespace(model_name="SmolLM2-135M"), cuda=True)
    main(["convert", str(folder / "train.pt"), str(folder / "train.safetensors"), "--model", str(model_dir),
          "--dim-names", "train,bias"])
    expected["train"], served["train"] = (p1, p2, 1e-3), folder / "train.safetensors"

    # steer_transfer.py from a 64-dim model's steer trained with eps 2e-3: given on the command line.
    p1, p2 = write_transfer_checkpoint(folder / "transfer.pt", _randn(2, 64, 64, seed=21, sigma=0.32),
                                       _randn(2, 64, 64, seed=22, sigma=0.32), hidden_to=hidden_size, seed=23)
    main(["convert", str(folder / "transfer.pt"), str(folder / "transfer.safetensors"), "--epsilon", "2e-3",
          "--dim-names", "transfer,bias", "--bias-dim", "bias=1"])
    expected["transfer"], served["transfer"] = (p1, p2, 2e-3), folder / "transfer.safetensors"

    # steer_transfer.py again, source eps 1e-3: --assume-defaults.
    p1, p2 = write_transfer_checkpoint(folder / "assumed.pt", _randn(2, 64, 64, seed=31, sigma=0.45),
                                       _randn(2, 64, 64, seed=32, sigma=0.45), hidden_to=hidden_size, seed=33)
    main(["convert", str(folder / "assumed.pt"), str(folder / "assumed.safetensors"), "--assume-defaults"])
    expected["assumed"], served["assumed"] = (p1, p2, 1e-3), folder / "assumed.safetensors"

    formula = {name: SteerFile.create(a, b, dim_names=["primary", "dummy"], epsilon=eps)
               for name, (a, b, eps) in expected.items()}
    return {name: str(path) for name, path in served.items()}, formula
