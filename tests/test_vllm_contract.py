"""The plugin's contract with every vLLM it supports, on a machine where only vLLM 0.32 (CPU build) runs.

Each fact of vllm_steer/serving/vllm_internals.py (modules, definitions, parameter lists, fields, enum
members, the moved names) is checked against each supported version's source, read without importing
it: the installed vLLM's and, for a version not installed here, its PyPI wheel's (fetched once into the
vllm-steer cache). What the plugin patches, wraps, subclasses or is called by is compared with the
version the end-to-end tests run (0.32), so that a change there is reviewed, not assumed. And the
start-up checks themselves must pass here and fail, by name, on a fact that does not hold."""

from __future__ import annotations

import pytest
from vllm_source import VllmSource, installed_source, release_source

from vllm_steer.serving import vllm_internals
from vllm_steer.serving.vllm_internals import (
    BEAM_SEARCH_REQUESTS,
    INTERNALS,
    MOVED,
    SUPPORTED_VLLM,
    Internal,
    check_internals,
    supported_minor,
)

# The version the end-to-end tests run, and the releases of the other supported versions read from PyPI.
TESTED_END_TO_END = "0.32"
RELEASES = {"0.33": "0.33.0"}

# What the plugin patches, wraps, subclasses, implements or is called by: the same code as in the version
# the end-to-end tests run, or a change someone read and recorded here (the digest of the new code and why
# it does not matter to the plugin).
PATCHED = (
    "vllm.model_executor.custom_op:PluggableLayer.register_oot",
    "vllm.model_executor.layers.logits_processor:LogitsProcessor",  # subclassed; its forward called
    "vllm.lora.layers.logits_processor:LogitsProcessorWithLoRA",  # calls the layer's forward as `self`
    "vllm.v1.worker.gpu_worker:Worker.load_model",  # wrapped
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model",  # wrapped (the legacy runner)
    "vllm.v1.worker.gpu.model_runner:GPUModelRunner.sample",  # wrapped (Model Runner V2)
    "vllm.v1.worker.gpu.input_batch:InputBatch",  # read by the sample wrapper
    *(f"{request}.to_beam_search_params" for request in BEAM_SEARCH_REQUESTS),  # wrapped
    "vllm.v1.sample.logits_processor.interface:LogitsProcessor",  # implemented (legacy runner)
    "vllm.v1.sample.logits_processor.interface:BatchUpdate",
    "vllm.v1.sample.logits_processor.interface:MoveDirectionality",
    "vllm.v1.sample.logits_processor:build_logitsprocs",  # loads the processor (legacy runner)
    "vllm.v1.worker.gpu.sample.logits_processor.interface:LogitsProcessor",  # implemented (Model Runner V2)
    "vllm.v1.worker.gpu.sample.logits_processor.interface:LogitsProcRequestState",
    "vllm.v1.worker.gpu.sample.logits_processor.loader:build_custom_logits_processors",
    "vllm.v1.worker.gpu.sample.sampler:Sampler.add_request",  # calls the processor's add_request
    "vllm.v1.worker.gpu.sample.sampler:Sampler.apply_staged_writes",
    "vllm.entrypoints.cli.serve:ServeSubcommand",  # what vllm-steer serve calls for several API servers
)
REVIEWED = {
    ("0.33", "vllm.entrypoints.openai.completion.protocol:CompletionRequest.to_beam_search_params"): (
        "0906374f1bc56089", "skip_special_tokens now falls back to the server's default and allowed_token_ids is "
        "passed on; the wrapper passes every argument through and reads only self.vllm_xargs, which is unchanged"),
    ("0.33", "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest.to_beam_search_params"): (
        "5ede0e54fed8b862", "the same change as CompletionRequest's"),
    ("0.33", "vllm.v1.worker.gpu.input_batch:InputBatch"): (
        "0140d4e75ba5a927", "adds pcp and num_admitted_draft_tokens and drops dcp_local_seq_lens_cpu_upper_bound; "
        "the four fields the sample wrapper reads (expanded_idx_mapping, idx_mapping_np, num_reqs, logits_indices) "
        "are checked by the facts and keep their meaning"),
}


@pytest.fixture(scope="module")
def installed() -> VllmSource:
    return installed_source()


@pytest.fixture(scope="module", params=SUPPORTED_VLLM)
def source(request, installed) -> VllmSource:
    if installed.minor == request.param:
        return installed
    return release_source(RELEASES[request.param])


def test_every_supported_version_is_checked(installed):
    assert installed.minor == TESTED_END_TO_END
    assert set(SUPPORTED_VLLM) == {installed.minor, *RELEASES}


@pytest.mark.parametrize("group", list(INTERNALS))
def test_every_fact_holds_in_the_source(source, group):
    problems = [problem for fact in INTERNALS[group] if (problem := source.problem(fact))]
    assert not problems, "\n".join(problems)


def test_moved_names_live_only_where_the_table_says(source):
    for name, homes in MOVED.items():
        assert source.find(f"{homes[source.minor]}:{name}") is not None, (name, source.version)
        for home in set(homes.values()) - {homes[source.minor]}:
            assert source.find(f"{home}:{name}") is None, f"{name} is still in {home} in {source.version}"


def test_the_beam_search_refusal_covers_every_request_class_that_can_reach_beam_search(source):
    """Every request class with both to_beam_search_params and vllm_xargs, found in the source."""
    assert sorted(source.classes_with("to_beam_search_params", "vllm_xargs")) == sorted(BEAM_SEARCH_REQUESTS)


def test_what_the_plugin_patches_is_the_tested_code_or_a_reviewed_change(source, installed):
    changed = []
    for target in PATCHED:
        new, tested = source.digest(target), installed.digest(target)
        if new == tested:
            continue
        reviewed = REVIEWED.get((source.minor, target))
        if reviewed is None or reviewed[0] != new:
            found = source.find(target)
            changed.append(f"{target} differs in vLLM {source.version} from {installed.version} ({found.where}); "
                           f"read the change, then record (\"{source.minor}\", \"{target}\"): (\"{new}\", why) in "
                           "REVIEWED")
    assert not changed, "\n".join(changed)
    stale = [key for key in REVIEWED if key[0] == source.minor
             and source.digest(key[1]) == installed.digest(key[1])]
    assert not stale, f"reviewed changes that are no longer changes: {stale}"


def test_source_checks_name_the_file_and_line_of_a_fact_that_fails(installed):
    wrong = Internal("vllm.v1.worker.gpu_worker:Worker.load_model", "a test", params=("self",))
    problem = installed.problem(wrong)
    assert problem is not None and "gpu_worker.py:" in problem and "load_dummy_weights" in problem
    missing = Internal("vllm.v1.sample.logits_processor.interface:BatchUpdate", "a test", fields=("gone",))
    assert "has no gone" in installed.problem(missing) and "interface.py:" in installed.problem(missing)
    assert "is not defined" in installed.problem(Internal("vllm.no_such_module:Thing", "a test"))


def test_the_start_up_checks_pass_on_the_installed_vllm():
    for group in INTERNALS:
        check_internals(group)


def test_the_start_up_checks_fail_by_name(monkeypatch):
    wrong = Internal("vllm.v1.worker.gpu_worker:Worker.load_model", "wrapped", params=("self", "renamed"))
    monkeypatch.setitem(INTERNALS, "plugin", (*INTERNALS["plugin"], wrong))
    with pytest.raises(RuntimeError, match=r"Worker\.load_model \(wrapped\): has parameters"):
        check_internals("plugin")
    monkeypatch.setattr(vllm_internals, "vllm_version", lambda: "0.34.0")
    with pytest.raises(vllm_internals.UnsupportedVllm, match=r"supports vLLM 0\.32\.x and 0\.33\.x; .* vLLM 0\.34\.0"):
        check_internals("launcher")


@pytest.mark.parametrize(("version", "minor"), [("0.32.0", "0.32"), ("0.33.1", "0.33"), ("0.33", "0.33"),
                                                ("0.34.0", None), ("0.330.0", None), ("0.3", None), ("dev", None)])
def test_supported_versions(version, minor):
    assert supported_minor(version) == minor
