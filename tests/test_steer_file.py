"""The steer file format and the reference-checkpoint import: real safetensors files on disk."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_steer import SteerFile, SteerFileError, embedding_fingerprint
from vllm_steer.steer.file import read_header
from vllm_steer.steer.fingerprint import fingerprint_mismatch
from vllm_steer.tools.reference import convert_reference_checkpoint


def make_steer(k=2, d=24, r=5, seed=0, **kw) -> SteerFile:
    g = torch.Generator().manual_seed(seed)
    names = kw.pop("dim_names", ["tone", "bias"][:k] if k <= 2 else [f"d{i}" for i in range(k)])
    return SteerFile.create(torch.randn(k, d, r, generator=g), torch.randn(k, d, r, generator=g),
                            dim_names=names, **kw)


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    emb = torch.randn(100, 24)
    steer = make_steer(epsilon=2e-3, bias_dims={"bias": 1.0}, base_model="m", fingerprint=embedding_fingerprint(emb),
                       recipe={"lr": 0.01, "steps": 3}, source="test")
    steer.save(tmp_path / "s.safetensors")
    back = SteerFile.load(tmp_path / "s.safetensors")
    assert back.header == steer.header
    assert torch.equal(back.projector1, steer.projector1) and torch.equal(back.projector2, steer.projector2)
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        meta = f.metadata()
    # Self-describing: the raw metadata alone says what the file is.
    assert meta["format"] == "vllm-steer/1"
    assert json.loads(meta["dim_names"]) == ["tone", "bias"] and meta["primary_dim"] == "tone"
    assert json.loads(meta["bias_dims"]) == {"bias": 1.0}
    assert (meta["hidden_size"], meta["rank"], meta["num_dims"]) == ("24", "5", "2")
    assert float(meta["epsilon"]) == 2e-3 and meta["base_model"] == "m"
    assert read_header(tmp_path / "s.safetensors") == steer.header


def test_bf16_save_loads_back_as_bf16(tmp_path):
    make_steer().save(tmp_path / "s.safetensors", dtype=torch.bfloat16)
    assert SteerFile.load(tmp_path / "s.safetensors").projector1.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda t, m: t.update(projector1=t["projector1"][:, :, :3].contiguous()), "projector1 has shape"),
        (lambda t, m: t["projector2"].__setitem__((0, 0, 0), float("inf")), "NaN or infinite"),
        (lambda t, m: t.pop("projector2"), "missing tensors"),
        (lambda t, m: m.update(format="something-else"), "not a vllm-steer file"),
        (lambda t, m: m.update(dim_names='["a", "a"]'), "distinct"),
        (lambda t, m: m.update(primary_dim="nope"), "primary_dim 'nope'"),
        (lambda t, m: m.update(epsilon="-1"), "epsilon must be a positive"),
        (lambda t, m: m.update(bias_dims='{"zzz": 1}'), "bias dim 'zzz'"),
        (lambda t, m: m.pop("hidden_size"), "malformed metadata"),
        (lambda t, m: m.update(num_dims="3"), "num_dims 3"),
    ],
)
def test_malformed_files_are_refused_with_the_reason(tmp_path, mutate, message):
    steer = make_steer()
    tensors = {"projector1": steer.projector1.clone(), "projector2": steer.projector2.clone()}
    meta = steer.header.to_metadata()
    mutate(tensors, meta)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(SteerFileError, match="bad.safetensors") as err:
        SteerFile.load(tmp_path / "bad.safetensors")
    assert message in str(err.value)
    # The same checks on the file's bytes (what a runtime load sends to the workers).
    with pytest.raises(SteerFileError, match="sent by the front end") as err:
        SteerFile.from_bytes((tmp_path / "bad.safetensors").read_bytes(), where="sent by the front end")
    assert message in str(err.value)


def test_from_bytes_reads_what_load_reads(tmp_path):
    steer = make_steer(bias_dims={"bias": 1.0}, fingerprint=embedding_fingerprint(torch.randn(100, 24)))
    steer.save(tmp_path / "s.safetensors")
    back = SteerFile.from_bytes((tmp_path / "s.safetensors").read_bytes())
    assert back.header == SteerFile.load(tmp_path / "s.safetensors").header == steer.header
    assert torch.equal(back.projector1, steer.projector1) and torch.equal(back.projector2, steer.projector2)


@pytest.mark.parametrize("data,message", [
    (b"", "0 bytes"), (b"\x05\x00\x00\x00\x00\x00\x00\x00{}", "header length 5"),
    ((2**62).to_bytes(8, "little") + b"{}", "header length"),
    ((9).to_bytes(8, "little") + b"not json!", "header"),
    ((31).to_bytes(8, "little") + b'{"__metadata__": {"format": 3}}', "not a string map"),
])
def test_garbage_bytes_are_refused(data, message):
    with pytest.raises(SteerFileError, match="not a readable safetensors file") as err:
        SteerFile.from_bytes(data)
    assert message in str(err.value)


def test_non_safetensors_input_never_unpickles(tmp_path):
    """A pickle renamed .safetensors is refused without being executed."""
    marker = tmp_path / "executed"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Boom()}, tmp_path / "evil.safetensors")
    with pytest.raises(SteerFileError, match="not a readable safetensors file"):
        SteerFile.load(tmp_path / "evil.safetensors")
    with pytest.raises(SteerFileError, match="not a readable safetensors file"):
        SteerFile.from_bytes((tmp_path / "evil.safetensors").read_bytes())
    assert not marker.exists()


def test_fingerprint_tells_models_apart_and_tolerates_bf16():
    emb = torch.randn(1000, 32)
    fp = embedding_fingerprint(emb)
    assert fingerprint_mismatch(fp, emb) is None
    assert fingerprint_mismatch(fp, emb.bfloat16()) is None
    assert "norm" in fingerprint_mismatch(fp, torch.randn(1000, 32))
    assert "vocabulary size" in fingerprint_mismatch(fp, emb, vocab_size=999)
    # A tensor-parallel shard is checked on the rows it holds.
    assert fingerprint_mismatch(fp, emb[500:], first_row=500) is None
    assert fingerprint_mismatch(fp, torch.randn(500, 32), first_row=500) is not None


def write_reference_checkpoint(path, k=2, d=24, r=6, **args):
    namespace = argparse.Namespace(model_name="gpt2", adaptor_class="multiply", epsilon=1e-3, rank=r,
                                   num_steers=k, training_steer=0, dummy_steer=1, lr=0.01, **args)
    state = {"projector1": torch.randn(k, d, r), "projector2": torch.randn(k, d, r)}
    torch.save([namespace, state, 1000], path)
    return namespace, state


def test_convert_reference_checkpoint(tmp_path):
    ns, state = write_reference_checkpoint(tmp_path / "ref.pt", epsilon_extra=None)
    emb = torch.randn(50, 24)
    steer = convert_reference_checkpoint(tmp_path / "ref.pt", output_embedding=emb, base_model="gpt2-local").steer
    h = steer.header
    assert h.dim_names == ("steer", "bias") and h.primary_dim == "steer" and h.bias_dims == {"bias": 1.0}
    assert h.epsilon == 1e-3 and h.base_model == "gpt2-local" and h.recipe["step"] == 1000
    assert h.fingerprint == embedding_fingerprint(emb)
    assert torch.equal(steer.projector1, state["projector1"]) and torch.equal(steer.projector2, state["projector2"])


def test_convert_uses_namespace_dims(tmp_path):
    ns = argparse.Namespace(model_name="x", epsilon=5e-3, training_steer=1, dummy_steer=None)
    torch.save([ns, {"projector1": torch.randn(3, 8, 2), "projector2": torch.randn(3, 8, 2)}, 7], tmp_path / "r.pt")
    steer = convert_reference_checkpoint(tmp_path / "r.pt").steer
    assert steer.header.dim_names == ("dim0", "steer", "dim2") and steer.header.bias_dims == {}
    assert steer.header.epsilon == 5e-3 and steer.header.fingerprint is None


def test_convert_refuses_other_adaptors_and_bad_payloads(tmp_path):
    torch.save([argparse.Namespace(adaptor_class="add"), {"add_vec": torch.randn(2, 8)}, 1], tmp_path / "a.pt")
    with pytest.raises(SteerFileError, match="adaptor_class 'add'"):
        convert_reference_checkpoint(tmp_path / "a.pt")
    torch.save({"not": "a list"}, tmp_path / "b.pt")
    with pytest.raises(SteerFileError, match="expected"):
        convert_reference_checkpoint(tmp_path / "b.pt")


def test_convert_cli_writes_a_loadable_file(tmp_path):
    from vllm_steer.cli import main

    write_reference_checkpoint(tmp_path / "ref.pt")
    main(["convert", str(tmp_path / "ref.pt"), str(tmp_path / "out.safetensors"), "--dim-names", "toxicity,bias"])
    steer = SteerFile.load(tmp_path / "out.safetensors")
    assert steer.header.dim_names == ("toxicity", "bias") and steer.header.primary_dim == "toxicity"
