"""The state processor against vLLM's real interface classes for both model runners, on CPU.

Model Runner V2 cannot run end to end here (its config needs a Triton GPU backend), so its
path is exercised at the level of vLLM's own classes and its real `GPUModelRunner.sample`;
the runner's config and input batch are stand-ins carrying only the fields the plugin reads.
The legacy runner is exercised end to end in test_serving.py; here its batch bookkeeping is
checked against a plain model of the batch."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from helpers import stand_in_config
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcRequestState
from vllm.v1.worker.gpu.sample.logits_processor.loader import build_custom_logits_processors_params_validator

from vllm_steer import SteerConfig, SteerFile
from vllm_steer.plugin import SteerLogitsProcessor, register_plugin
from vllm_steer.serving.worker import SamplingRows
from vllm_steer.steer.values import parse_steer_args, steer_values


@pytest.fixture
def served(steer_paths, monkeypatch, worker_steering, fresh_front_end):
    monkeypatch.setenv("VLLM_STEER_CONFIG", SteerConfig(steers=steer_paths).to_json())
    register_plugin()  # as vLLM's plugin loader does in every process, before any model is built
    return {name: SteerFile.load(path) for name, path in steer_paths.items()}


def expected_row(h, steers, xargs):
    out = h.double().clone()
    for key, value in (xargs or {}).items():
        steer = steers[key.removeprefix("steer_")]
        s = value if isinstance(value, list) else steer_values(steer.header, value)
        for k, s_k in enumerate(s):
            p1, p2 = steer.projector1[k].double(), steer.projector2[k].double()
            out += steer.header.epsilon * s_k * (h.double() @ p1) @ p2.T
    return out


def test_mrv2_loader_accepts_the_processor_and_validates_requests(served):
    from vllm.exceptions import VLLMValidationError

    validate = build_custom_logits_processors_params_validator(["vllm_steer.plugin:SteerLogitsProcessor"])
    validate(SamplingParams(extra_args={"steer_alpha": 3}))
    with pytest.raises(VLLMValidationError, match="unknown steer 'nope'"):
        validate(SamplingParams(extra_args={"steer_nope": 3}))


def test_mrv2_steers_exactly_the_mapped_slots(served):
    """Slots are filled by add_request; the real GPUModelRunner.sample (wrapped by the plugin)
    computes the logits, and each logits row is steered with its own slot's values. Rows come
    in any slot order, a request may own several rows (speculative decoding), and -1 marks
    padding."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    req_states = LogitsProcRequestState(device=torch.device("cpu"), max_num_reqs=8, vocab_size=49152,
                                        all_token_ids=None, prompt_len=None, prefill_len=None, total_len=None)
    proc = SteerLogitsProcessor(stand_in_config(v2=True), req_states)
    slot_xargs = {3: {"steer_alpha": 5}, 0: None, 5: {"steer_alpha": [1, -2], "steer_beta": 4}, 6: {"steer_beta": -3}}
    for slot, xargs in slot_xargs.items():
        assert proc.add_request(slot, SamplingParams(extra_args=xargs)) is False
    proc.apply_staged_writes()
    rows = [3, 0, 5, 5, 6, -1]
    h = torch.randn(len(rows), 576)
    steered = run_real_sample(GPUModelRunner, h, rows)
    for i, slot in enumerate(rows):
        want = expected_row(h[i], served, slot_xargs.get(slot))
        torch.testing.assert_close(steered[i].double(), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(steered[1], h[1]) and torch.equal(steered[5], h[5])
    # A recycled slot is fully re-initialised: slot 3's next occupant is unsteered.
    proc.add_request(3, SamplingParams())
    proc.apply_staged_writes()
    assert torch.equal(run_real_sample(GPUModelRunner, h, rows)[0], h[0])
    # A step whose requests are all unsteered skips the op.
    assert torch.equal(run_real_sample(GPUModelRunner, h[:2], [3, 0]), h[:2])


class _LogitsComputed(Exception):
    pass


def run_real_sample(runner_cls, h, rows):
    """Call the real (wrapped) GPUModelRunner.sample up to its logits computation and return
    the hidden states the steered layer produced for the LM head."""
    from vllm_steer.serving.worker import worker_steering

    seen = {}

    def compute_logits(hidden):  # the model's steered logits layer, as far as it steers
        seen["h"] = worker_steering().steer_sampling_rows(hidden)
        raise _LogitsComputed

    runner = SimpleNamespace(batch_sharder=None, model=SimpleNamespace(compute_logits=compute_logits))
    mapping = torch.tensor(rows)
    real_slots = sorted({r for r in rows if r >= 0}, key=rows.index)
    batch = SimpleNamespace(logits_indices=torch.arange(len(rows)), expanded_idx_mapping=mapping,
                            idx_mapping_np=torch.tensor(real_slots).numpy(), num_reqs=len(real_slots))
    with pytest.raises(_LogitsComputed):
        runner_cls.sample(runner, h, batch, None)
    return seen["h"]


def test_v1_table_follows_batch_updates(served, worker_steering):
    """Random add/remove/move/swap sequences, applied in vLLM's order (removed, added,
    moved), leave every row holding its own request's values."""
    proc = SteerLogitsProcessor(stand_in_config(v2=False, max_num_seqs=16), torch.device("cpu"), False)
    rng = random.Random(0)
    model: list[dict | None] = []  # what each row of the persistent batch should hold
    choices = [None, {"steer_alpha": 2}, {"steer_beta": -1}, {"steer_alpha": -4, "steer_beta": 2}]
    for _ in range(200):
        removed = sorted(rng.sample(range(len(model)), k=min(len(model), rng.randint(0, 2))))
        for row in removed:
            model[row] = "hole"
        added = []
        for _ in range(rng.randint(0, 3)):
            if len(model) >= 16 and "hole" not in model:
                break
            row = model.index("hole") if "hole" in model else len(model)
            xargs = rng.choice(choices)
            if row < len(model):
                model[row] = xargs
            else:
                model.append(xargs)
            added.append((row, SamplingParams(extra_args=xargs), None, []))
        moved = []
        while "hole" in model:  # condense: move the last live row into the first hole
            hole = model.index("hole")
            last = max(i for i, x in enumerate(model) if x != "hole")
            if last < hole:
                del model[hole:]
                break
            model[hole], model[last] = model[last], "hole"
            moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
        if len(model) >= 2 and rng.random() < 0.3:
            a, b = rng.sample(range(len(model)), 2)
            model[a], model[b] = model[b], model[a]
            moved.append((a, b, MoveDirectionality.SWAP))
        proc.update_state(BatchUpdate(batch_size=len(model), removed=removed, added=added, moved=moved))
        for row, xargs in enumerate(model):
            request = parse_steer_args(xargs, proc.table.bank.headers, 50)
            indices, values = proc.table.bank.row_entries(request)
            held = [int(n) for n in proc.table.host_steers[row] if n >= 0]
            assert held == indices, (row, xargs)
            for slot, vals in enumerate(values):
                assert proc.table.host_values[row, slot, :len(vals)].tolist() == pytest.approx(vals), (row, xargs)
        assert worker_steering._armed == SamplingRows(len(model), any(bool(x) for x in model))


def test_mrv2_refuses_a_model_built_without_the_steered_layer(served, monkeypatch):
    """Model Runner V2 builds processors after the model: if the general plugin did not register
    the steered layer first (VLLM_PLUGINS without vllm_steer), start-up fails with the remedy
    rather than serving requests unsteered."""
    from vllm.model_executor.custom_op import op_registry_oot

    monkeypatch.delitem(op_registry_oot, "LogitsProcessor", raising=False)
    req_states = LogitsProcRequestState(device=torch.device("cpu"), max_num_reqs=4, vocab_size=49152,
                                        all_token_ids=None, prompt_len=None, prefill_len=None, total_len=None)
    with pytest.raises(RuntimeError, match="include vllm_steer"):
        SteerLogitsProcessor(stand_in_config(v2=True), req_states)


def test_a_loaded_model_is_checked_and_the_steers_placed_before_any_step(served, worker_steering, monkeypatch,
                                                                         output_embedding):
    """Right after vLLM loads the model (whether or not a warm-up follows): a model whose logits
    layer is vLLM's own is refused; one with the steered layer gets its steers checked against its
    LM head and placed; a pipeline stage without a logits layer is left alone."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    from vllm_steer.serving.vllm_patches import attach_model

    proc = SteerLogitsProcessor(stand_in_config(v2=False), torch.device("cpu"), False)
    head = torch.nn.Module()
    head.weight = torch.nn.Parameter(output_embedding, requires_grad=False)
    head.shard_indices = SimpleNamespace(num_org_elements=output_embedding.shape[0], org_vocab_start_index=0)
    with set_current_vllm_config(VllmConfig()):
        steered = torch.nn.ModuleDict({"lm_head": head, "logits_processor": LogitsProcessor(49152)})
        monkeypatch.delitem(op_registry_oot, "LogitsProcessor")
        plain = torch.nn.ModuleDict({"lm_head": head, "logits_processor": LogitsProcessor(49152)})
    with pytest.raises(RuntimeError, match="built without the steered logits layer"):
        attach_model(plain, torch.float32)
    attach_model(torch.nn.ModuleDict({"layer": torch.nn.Linear(2, 2)}), torch.float32)  # no LM head here
    assert worker_steering.placement is None
    steered.lm_head = head
    attach_model(steered, torch.float32)
    assert worker_steering.placement == (torch.device("cpu"), torch.float32) and worker_steering.lm_head is head
    assert steered.logits_processor.steering is worker_steering  # the layer is handed the worker's steering
    assert proc.table.bank.device == torch.device("cpu")


def test_mrv2_sampler_warm_up_leaves_every_slot_unsteered(served):
    """Model Runner V2's profiling pass (vLLM 0.33 on a GPU, the same call sequence in 0.32's warm-up)
    adds a dummy request with SamplingParams.for_sampler_warmup() to every slot, then calls
    apply_staged_writes: even slots that held steered requests before must read as unsteered."""
    req_states = LogitsProcRequestState(device=torch.device("cpu"), max_num_reqs=8, vocab_size=49152,
                                        all_token_ids=None, prompt_len=None, prefill_len=None, total_len=None)
    proc = SteerLogitsProcessor(stand_in_config(v2=True), req_states)
    for slot in (1, 4):
        proc.add_request(slot, SamplingParams(extra_args={"steer_alpha": 5}))
    proc.apply_staged_writes()
    assert proc.table.steered.any()
    warmup = SamplingParams.for_sampler_warmup()
    for slot in range(8):
        assert proc.add_request(slot, warmup) is False
    proc.apply_staged_writes()
    assert not proc.table.steered.any()
    assert bool((proc.table.steers == -1).all()) and bool((proc.table.values == 0).all())
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    h = torch.randn(8, 576)
    assert torch.equal(run_real_sample(GPUModelRunner, h, list(range(8))), h)


def test_prompt_logprobs_of_either_kind_are_refused_beside_steering(served):
    """Prompt logprobs come from the prompt's hidden states, which no steer touches: with a steer they
    would be the unsteered model's. Both kinds (top tokens, and chosen token ids: vLLM's
    prompt_logprob_token_ids, which Model Runner V2 serves) are refused, through vLLM's own MRV2
    validator; without a steer both pass."""
    from vllm.exceptions import VLLMValidationError

    validate = build_custom_logits_processors_params_validator(["vllm_steer.plugin:SteerLogitsProcessor"])
    for kind in ({"prompt_logprobs": 1}, {"prompt_logprob_token_ids": [[5, 7]]}):
        field = next(iter(kind))
        with pytest.raises(VLLMValidationError, match=f"{field} cannot be combined with steering"):
            validate(SamplingParams(extra_args={"steer_alpha": 2}, **kind))
        validate(SamplingParams(**kind))
        validate(SamplingParams(extra_args={"other": 1}, **kind))


def test_steered_beam_search_is_refused_for_speech_to_text_too(served):
    """The transcription and translation request classes turn a request into beam-search parameters as
    completions and chat do, and carry vllm_xargs. No speech model runs here, so their real request
    classes are exercised directly: steered beam search refused, unsteered beam search untouched."""
    from vllm.entrypoints.speech_to_text.transcription.protocol import TranscriptionRequest
    from vllm.entrypoints.speech_to_text.translation.protocol import TranslationRequest

    from vllm_steer.steer.values import SteerRequestError

    for request_class in (TranscriptionRequest, TranslationRequest):
        plain = request_class.model_construct(**{**_defaults(request_class), "use_beam_search": True, "n": 2})
        assert plain.to_beam_search_params(16).beam_width == 2
        steered = plain.model_copy(update={"vllm_xargs": {"steer_alpha": 3}})
        with pytest.raises(SteerRequestError, match="use_beam_search"):
            steered.to_beam_search_params(16)
        other = plain.model_copy(update={"vllm_xargs": {"other": 1}})
        assert other.to_beam_search_params(16, {}).max_tokens == 16


def _defaults(model_class) -> dict:
    return {name: field.get_default(call_default_factory=True) for name, field in model_class.model_fields.items()
            if not field.is_required()}


def test_only_the_steps_sampling_call_is_steered_and_a_surprise_is_loud(served, worker_steering):
    """The runner says which logits call is the step's sampling one (the legacy runner's execute_model and
    Model Runner V2's sample open a window around it): outside the window (profile runs, prompt logprobs)
    rows pass through untouched; inside, the armed rows are steered; a call with another row count, or a
    second call in the window, while steered rows are armed, raises instead of serving them unsteered."""
    proc = SteerLogitsProcessor(stand_in_config(v2=False), torch.device("cpu"), False)
    proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[],
                                  added=[(0, SamplingParams(extra_args={"steer_alpha": 5}), None, []),
                                         (1, SamplingParams(), None, [])]))
    h = torch.randn(2, 576)
    assert worker_steering.steer_sampling_rows(h) is h  # no window: not the sampling call
    with worker_steering.sampling():
        steered = worker_steering.steer_sampling_rows(h)
        with pytest.raises(RuntimeError, match="in call 2, where 2 rows in one call were expected"):
            worker_steering.steer_sampling_rows(h)
    torch.testing.assert_close(steered[0].double(), expected_row(h[0], served, {"steer_alpha": 5}),
                               rtol=1e-5, atol=1e-4)
    assert torch.equal(steered[1], h[1])
    with worker_steering.sampling(), pytest.raises(RuntimeError, match="computed from 3 rows in call 1"):
        worker_steering.steer_sampling_rows(torch.randn(3, 576))
    proc.update_state(BatchUpdate(batch_size=1, removed=[0], moved=[(1, 0, MoveDirectionality.UNIDIRECTIONAL)],
                                  added=[]))
    with worker_steering.sampling():  # nothing steered armed: any call passes through
        other = torch.randn(5, 576)
        assert worker_steering.steer_sampling_rows(other) is other
    # The legacy runner updates its batch inside execute_model, after the window opened: the rows armed then
    # are the step's (vLLM's condense can move the last row into a hole, reporting no removal).
    with worker_steering.sampling():
        proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[],
                                      added=[(1, SamplingParams(extra_args={"steer_beta": -3}), None, [])]))
        steered = worker_steering.steer_sampling_rows(h)
    assert torch.equal(steered[0], h[0])
    torch.testing.assert_close(steered[1].double(), expected_row(h[1], served, {"steer_beta": -3}),
                               rtol=1e-5, atol=1e-4)
