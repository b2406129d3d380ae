"""`vllm-steer convert` on checkpoints written as each LM-Steer reference script writes them: what
it reads, what it refuses to guess, what it assumes when told to, and what it records (no server)."""

from __future__ import annotations

import datetime
import json

import pytest
import torch
from reference_writers import first_release_namespace, head_namespace, write_train_checkpoint, write_transfer_checkpoint

from vllm_steer import SteerFile, SteerFileError
from vllm_steer.cli import main
from vllm_steer.tools.reference import ConvertOptions, convert_reference_checkpoint


def projectors(k=2, d=16, r=4, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, r, generator=g), torch.randn(k, d, r, generator=g)


def origins(steer: SteerFile) -> dict[str, str]:
    return {name: s["origin"] for name, s in steer.header.recipe["settings"].items()}


def test_train_checkpoint_saved_on_cuda_converts_from_its_namespace(tmp_path):
    p1, p2 = projectors(r=4)
    write_train_checkpoint(tmp_path / "ref.pt", p1, p2, head_namespace(rank=4, epsilon=2e-3), step=1000, cuda=True)
    if not torch.cuda.is_available():  # the premise: the file really says cuda:0
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "ref.pt", weights_only=False)
    conversion = convert_reference_checkpoint(tmp_path / "ref.pt")
    steer, h = conversion.steer, conversion.steer.header
    assert torch.equal(steer.projector1, p1) and torch.equal(steer.projector2, p2)
    assert steer.projector1.device.type == "cpu" and not steer.projector1.requires_grad
    assert h.dim_names == ("steer", "bias") and h.primary_dim == "steer" and h.bias_dims == {"bias": 1.0}
    assert h.epsilon == 2e-3 and h.base_model == "gpt2-large"
    assert h.recipe["step"] == 1000 and h.recipe["transferred"] is False
    assert h.recipe["reference_args"]["dummy_steer"] == 1 and h.recipe["reference_args"]["lr"] == 1e-2
    assert all(o.startswith("read from the Namespace") for o in origins(steer).values()), origins(steer)
    assert "train.py" in h.source and "assumed" not in h.source


def test_transfer_checkpoint_is_refused_until_told(tmp_path):
    src1, src2 = projectors(d=8, r=4)
    p1, p2 = write_transfer_checkpoint(tmp_path / "t.pt", src1, src2, hidden_to=16, step=700)
    with pytest.raises(SteerFileError) as refused:
        convert_reference_checkpoint(tmp_path / "t.pt")
    message = str(refused.value)
    for needle in ("epsilon, bias dims, primary dim", "no Namespace", "--epsilon", "--bias-dim DIM=VALUE",
                   "--primary-dim", "--assume-defaults", "eps 0.001, primary dim 0, dim 1 held at 1",
                   "--num_steers 2 --dummy_steer 1", "--steer_values v 1"):
        assert needle in message, (needle, message)
    # Only the bias dim given: eps is still unknown (the primary dim follows: the only other dim).
    with pytest.raises(SteerFileError, match=r"does not say its epsilon: it has no Namespace"):
        convert_reference_checkpoint(tmp_path / "t.pt", ConvertOptions(bias_dims={"1": 1.0}))

    told = convert_reference_checkpoint(tmp_path / "t.pt", ConvertOptions(
        epsilon=2e-3, bias_dims={"bias": 1.0}, dim_names=["tone", "bias"])).steer
    assert told.header.dim_names == ("tone", "bias") and told.header.primary_dim == "tone"
    assert told.header.bias_dims == {"bias": 1.0} and told.header.epsilon == 2e-3
    assert torch.equal(told.projector1, p1) and torch.equal(told.projector2, p2)
    assert origins(told) == {"epsilon": "given on the command line (--epsilon)",
                             "primary_dim": "the only dim that is not a bias dim",
                             "bias_dims": "given on the command line (--bias-dim)"}
    assert told.header.recipe["transferred"] is True and told.header.recipe["reference_args"] is None
    assert told.header.recipe["step"] == 700


def test_transfer_checkpoint_with_assume_defaults_records_the_assumption(tmp_path):
    p1, p2 = write_transfer_checkpoint(tmp_path / "t.pt", *projectors(d=8, r=4), hidden_to=16)
    steer = convert_reference_checkpoint(tmp_path / "t.pt", ConvertOptions(assume_defaults=True)).steer
    h = steer.header
    assert h.dim_names == ("steer", "bias") and h.bias_dims == {"bias": 1.0} and h.epsilon == 1e-3
    assert all(o.startswith("assumed") for o in origins(steer).values()), origins(steer)
    assert "assumed" in h.source and "steer_transfer.py" in h.source
    # K != 2: the README's dummy-dim layout does not apply, and the primary dim is still dim 0.
    write_transfer_checkpoint(tmp_path / "t3.pt", *projectors(k=3, d=8, r=4), hidden_to=16)
    h3 = convert_reference_checkpoint(tmp_path / "t3.pt", ConvertOptions(assume_defaults=True)).steer.header
    assert h3.bias_dims == {} and h3.primary_dim == "steer" and h3.dim_names == ("steer", "dim1", "dim2")


def test_command_line_overrides_the_namespace_and_says_so(tmp_path):
    write_train_checkpoint(tmp_path / "ref.pt", *projectors(r=4), head_namespace(rank=4))
    conversion = convert_reference_checkpoint(tmp_path / "ref.pt", ConvertOptions(epsilon=5e-3, bias_dims={}))
    h = conversion.steer.header
    assert h.epsilon == 5e-3 and h.bias_dims == {} and h.dim_names == ("steer", "dim1")
    assert any("epsilon=0.001" in n and "0.005" in n for n in conversion.notes), conversion.notes
    assert any("dummy_steer" in n for n in conversion.notes) and h.recipe["notes"] == conversion.notes
    assert "given on the command line (--epsilon)" in conversion.report()
    # A dummy dim elsewhere than 1, and a trained dim elsewhere than 0, are read as such.
    write_train_checkpoint(tmp_path / "r3.pt", *projectors(k=3, r=4),
                           head_namespace(rank=4, num_steers=3, training_steer=2, dummy_steer=0))
    h3 = convert_reference_checkpoint(tmp_path / "r3.pt").steer.header
    assert h3.dim_names == ("bias", "dim1", "steer") and h3.bias_dims == {"bias": 1.0}


def test_first_release_bool_dummy_steer(tmp_path):
    # dummy_steer True: a ones column appended after the label column, i.e. dim 1.
    write_train_checkpoint(tmp_path / "a.pt", *projectors(r=4), first_release_namespace(num_steers=2, rank=4,
                                                                                        dummy_steer=True))
    ha = convert_reference_checkpoint(tmp_path / "a.pt").steer.header
    assert ha.dim_names == ("steer", "bias") and ha.bias_dims == {"bias": 1.0} and ha.primary_dim == "steer"
    # dummy_steer False: no bias dim (False is not dim 0, which would also make the primary dim a bias dim).
    write_train_checkpoint(tmp_path / "b.pt", *projectors(k=1, r=4), first_release_namespace(num_steers=1, rank=4))
    hb = convert_reference_checkpoint(tmp_path / "b.pt").steer.header
    assert hb.dim_names == ("steer",) and hb.bias_dims == {}
    # pos_neg_independent: [positive, negative, ones]; no single signed dim, so the user must choose.
    write_train_checkpoint(tmp_path / "c.pt", *projectors(k=3, r=4),
                           first_release_namespace(num_steers=3, rank=4, dummy_steer=True, pos_neg_independent=True))
    with pytest.raises(SteerFileError, match="pos_neg_independent.*--primary-dim 0"):
        convert_reference_checkpoint(tmp_path / "c.pt")
    hc = convert_reference_checkpoint(tmp_path / "c.pt", ConvertOptions(primary_dim="0")).steer.header
    assert hc.dim_names == ("steer", "dim1", "bias") and hc.bias_dims == {"bias": 1.0}


@pytest.mark.parametrize("changes, message", [
    (dict(adapted_component="input_embedding"), "adapted_component 'input_embedding'"),
    (dict(num_steers=10), "num_steers=10 but the projectors have 2"),
    (dict(rank=1000), "rank=1000 but the projectors have 4"),
    (dict(training_steer=1, dummy_steer=1), "also the dummy dim"),
    (dict(dummy_steer=5), "dummy_steer 5 is not a dim index"),
])
def test_namespaces_that_do_not_fit_are_refused(tmp_path, changes, message):
    write_train_checkpoint(tmp_path / "r.pt", *projectors(r=4), head_namespace(**{"rank": 4, **changes}))
    with pytest.raises(SteerFileError, match=message):
        convert_reference_checkpoint(tmp_path / "r.pt")


def test_bad_dims_on_the_command_line_are_refused(tmp_path):
    write_transfer_checkpoint(tmp_path / "t.pt", *projectors(d=8, r=4), hidden_to=16)
    with pytest.raises(SteerFileError, match="--bias-dim 'bias' is not a dim.*--dim-names"):
        convert_reference_checkpoint(tmp_path / "t.pt", ConvertOptions(epsilon=1e-3, bias_dims={"bias": 1.0}))
    with pytest.raises(SteerFileError, match="--primary-dim '2' is not a dim.*0..1"):
        convert_reference_checkpoint(tmp_path / "t.pt", ConvertOptions(assume_defaults=True, primary_dim="2"))
    with pytest.raises(SteerFileError, match="also a bias dim"):
        convert_reference_checkpoint(tmp_path / "t.pt", ConvertOptions(epsilon=1e-3, primary_dim="1",
                                                                       bias_dims={"1": 1.0}))


def test_other_pickles_are_not_unpickled_unless_trusted(tmp_path):
    p1, p2 = projectors(r=4)
    torch.save([head_namespace(rank=4), {"projector1": p1, "projector2": p2}, datetime.date(2024, 5, 2)],
               tmp_path / "odd.pt")
    with pytest.raises(SteerFileError, match="datetime.date.*--trust-checkpoint"):
        convert_reference_checkpoint(tmp_path / "odd.pt")
    steer = convert_reference_checkpoint(tmp_path / "odd.pt", ConvertOptions(trust_pickle=True)).steer
    assert torch.equal(steer.projector1, p1) and steer.header.recipe["step"] is None
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SteerFileError, match="cannot read as a torch checkpoint"):
        convert_reference_checkpoint(tmp_path / "junk.pt")
    torch.save([{"epsilon": 1e-3}, {"projector1": p1, "projector2": p2}, 1], tmp_path / "dict.pt")
    with pytest.raises(SteerFileError, match="argparse.Namespace .*or None"):
        convert_reference_checkpoint(tmp_path / "dict.pt")


def test_cli_refuses_then_converts_and_prints_what_it_assumed(tmp_path, capsys):
    write_transfer_checkpoint(tmp_path / "t.pt", *projectors(d=8, r=4), hidden_to=16)
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(SystemExit) as exited:
        main(["convert", str(tmp_path / "t.pt"), out])
    assert exited.value.code == 2 and "--assume-defaults" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
    main(["convert", str(tmp_path / "t.pt"), out, "--assume-defaults"])
    printed = capsys.readouterr().out
    assert "steer_transfer.py" in printed and "assumed: the reference's default eps" in printed
    assert "assumed: dim 1 is the reference's dummy steer" in printed and f"wrote {out}" in printed
    main(["convert", str(tmp_path / "t.pt"), out, "--epsilon", "1e-3", "--dim-names", "tone,bias",
          "--bias-dim", "bias=1"])
    h = SteerFile.load(out).header
    assert h.bias_dims == {"bias": 1.0} and h.primary_dim == "tone"
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "t.pt"), out, "--epsilon", "1e-3", "--bias-dim", "1=1", "--bias-dim", "1=2"])
    assert "given twice" in capsys.readouterr().err


def test_head_bias_warning_for_a_model_whose_head_has_a_bias(tmp_path, capsys):
    """A tiny random GPT-J (its LM head has a bias, which the reference drops and vLLM adds)."""
    from transformers import GPTJConfig, GPTJForCausalLM

    config = GPTJConfig(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2, rotary_dim=4)
    model = GPTJForCausalLM(config)
    with torch.no_grad():
        model.lm_head.bias.normal_()
    model.save_pretrained(tmp_path / "gptj")
    write_train_checkpoint(tmp_path / "ref.pt", *projectors(d=16, r=4), head_namespace(rank=4, model_name="gptj"))
    out = tmp_path / "out.safetensors"
    main(["convert", str(tmp_path / "ref.pt"), str(out), "--model", str(tmp_path / "gptj")])
    err = capsys.readouterr().err
    assert "LM head has a bias" in err and "vLLM adds it" in err and "0 and unsteered included" in err
    h = SteerFile.load(out).header
    assert "vLLM adds it" in h.recipe["head_bias_warning"] and h.fingerprint is not None
    assert json.loads(json.dumps(h.recipe)) == h.recipe
