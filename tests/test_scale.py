"""vllm-steer under vLLM's scale-out modes, on the real CPU engine with the random 2-layer Llama
(conftest `tiny_model`): pipeline parallelism (PP=2: only the last stage steers, exactly), data
parallelism (DP=2: each engine core steers its own requests; a runtime load reaches every engine
before the front end admits the steer), two API servers (static steering, metrics summed across
the front ends), the Ray executor (refused by vLLM's CPU build: the test asserts vLLM's message),
and the checks that keep a multi-node server honest: each worker compares the steer set it loaded
with the digest the front end put in --additional-config, a worker that cannot read a configured
path names its node and the path, and runtime loads send the steer's bytes, not its path.

The unit tests at the top need no engine. The engine tests run one server at a time (a class
each), with the refusals started alongside the pipeline-parallel server to share its start-up:
about 6 minutes here on a quiet machine, most of it the PP server's torch.compile warm-up (vLLM's
CPU build needs it for PP: with --enforce-eager the second stage never gets its input buffer).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import time
from argparse import Namespace
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers import (
    PROMPTS,
    SERVER_ENV,
    TWO_PROCESS_ENV,
    complete,
    load_dir_args,
    metric,
    served_vs_formula,
    stand_in_config,
    two_cores,
)

from vllm_steer import SteerConfig, SteerFile, embedding_fingerprint
from vllm_steer.cli import main as cli_main
from vllm_steer.launch.plan import STATE_PROCESSOR, parse_vllm_args, plan_launch
from vllm_steer.serving import registry
from vllm_steer.serving.config import (
    ENV_VAR,
    PLAYGROUND_ENV,
    RUNTIME_UPDATES_ENV,
    STEER_ENV_VARS,
    expected_steer_digest,
    ray_env_vars_to_copy,
    steer_set_digest,
    with_steer_digest,
)
from vllm_steer.serving.front_end import admit, admitted
from vllm_steer.serving.processor import check_steer_set
from vllm_steer.testing import CPU_SERVER_ARGS, ServerProcess, plain_server_command, steer_server_command

HOST = socket.gethostname()
GAMMA_CASES = [{"steer_gamma": 5}, {"steer_gamma": [-3, 1]}, None]
DELTA_CASES = [{"steer_delta": 4}, {"steer_gamma": 3, "steer_delta": -4}]


# ---------------------------------------------------------------------------- steers for the tiny model


def tiny_steer(tiny_model, name: str, seed: int, embedding: torch.Tensor | None = None) -> SteerFile:
    """A K=2 steer (NAME, bias held at 1) for the tiny Llama, fingerprinted on its output
    embedding (or on `embedding`, to make one that must be refused)."""
    _, model, _, _ = tiny_model
    g = torch.Generator().manual_seed(seed)
    weights = model.get_output_embeddings().weight.detach() if embedding is None else embedding
    return SteerFile.create(torch.randn(2, 256, 8, generator=g) * 0.5, torch.randn(2, 256, 8, generator=g) * 0.5,
                            dim_names=[name, "bias"], bias_dims={"bias": 1.0}, epsilon=1e-2, base_model="tiny",
                            fingerprint=embedding_fingerprint(weights))


@pytest.fixture(scope="module")
def steers(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """gamma (conftest's), delta (loaded at run time) and stranger (another model's fingerprint)."""
    folder = tmp_path_factory.mktemp("scale_steers")
    paths = {"gamma": tiny_model[3], "delta": folder / "delta.safetensors", "stranger": folder / "stranger.safetensors"}
    tiny_steer(tiny_model, "delta", 11).save(paths["delta"])
    tiny_steer(tiny_model, "stranger", 12, embedding=torch.randn(49152, 256)).save(paths["stranger"])
    return paths


def loaded(paths: dict[str, Path], *names: str) -> dict[str, SteerFile]:
    return {n: SteerFile.load(paths[n]) for n in names}


# ---------------------------------------------------------------------------- the pieces, no engine


def test_steer_set_digest_names_contents_not_paths(tmp_path, steers):
    """The digest the front end sends and each worker recomputes: the same files at other paths
    (another node) give the same digest; other bytes, another bound or another name do not."""
    copy = tmp_path / "elsewhere.safetensors"
    copy.write_bytes(Path(steers["gamma"]).read_bytes())
    here, there = SteerConfig({"gamma": str(steers["gamma"])}), SteerConfig({"gamma": str(copy)})
    sha = {n: s for n, (_, s) in here.read_files().items()}
    assert sha == {n: s for n, (_, s) in there.read_files().items()}
    digest = steer_set_digest(here, sha)
    assert digest == steer_set_digest(there, sha)
    assert digest != steer_set_digest(here, {"gamma": "0" * 64})
    assert digest != steer_set_digest(SteerConfig({"gamma": str(copy)}, bounds={"gamma": 7.0}), sha)
    assert digest != steer_set_digest(SteerConfig({"other": str(copy)}), {"other": sha["gamma"]})
    # Carried in --additional-config next to whatever the operator put there.
    merged = with_steer_digest({"operator": {"x": 1}, "vllm_steer": {"note": "kept"}}, digest)
    assert merged == {"operator": {"x": 1}, "vllm_steer": {"note": "kept", "steer_set_sha256": digest}}
    assert expected_steer_digest(merged) == digest and expected_steer_digest({}) is None
    with pytest.raises(ValueError, match="reserved for vllm-steer"):
        with_steer_digest({"vllm_steer": "mine"}, digest)


def test_a_worker_refuses_a_steer_set_other_than_the_front_ends(steers):
    config = SteerConfig({"gamma": str(steers["gamma"])})
    sha = {n: s for n, (_, s) in config.read_files().items()}
    check_steer_set(config, sha, {})  # nothing to compare with (plain `vllm serve`)
    check_steer_set(config, sha, {"vllm_steer": {"steer_set_sha256": steer_set_digest(config, sha)}})
    stale = SteerConfig({"gamma": str(steers["gamma"])}, bounds={"gamma": 7.0})  # what the front end started with
    with pytest.raises(RuntimeError, match="not the one the front end started with") as err:
        check_steer_set(config, sha, {"vllm_steer": {"steer_set_sha256": steer_set_digest(stale, sha)}})
    assert HOST in str(err.value) and sha["gamma"][:12] in str(err.value) and str(steers["gamma"]) in str(err.value)


def test_a_path_this_node_cannot_read_names_the_node_and_the_path(tmp_path):
    config = SteerConfig({"gone": str(tmp_path / "gone.safetensors")})
    with pytest.raises(ValueError, match="steer file not found or unreadable") as err:
        config.read_files()
    assert f"on node {HOST}" in str(err.value) and str(tmp_path / "gone.safetensors") in str(err.value)


def test_ray_workers_are_told_to_copy_the_steer_variables():
    ours = f"{ENV_VAR},{RUNTIME_UPDATES_ENV},{PLAYGROUND_ENV},VLLM_PLUGINS"
    assert ray_env_vars_to_copy(None) == ours
    assert ray_env_vars_to_copy(" MY_VAR ,, OTHER") == f"MY_VAR,OTHER,{ours}"
    assert ray_env_vars_to_copy(f"{ENV_VAR},MY_VAR") == \
        f"{ENV_VAR},MY_VAR,{RUNTIME_UPDATES_ENV},{PLAYGROUND_ENV},VLLM_PLUGINS"


def test_launch_plan():
    """What `vllm-steer serve` adds to the operator's vLLM arguments: the steer set digest merged into the
    operator's --additional-config, and nothing else for several API servers, data parallelism and headless
    nodes (vLLM's dispatcher starts those); one API server when runtime updates meet data parallelism.
    vLLM's arguments are parsed once, by vLLM's own parser, and the plan made from that parse."""
    def plan(args: list[str], runtime_updates: bool = False):
        return plan_launch(parse_vllm_args("m", args), args, "d" * 64, runtime_updates=runtime_updates)

    single = plan(["--additional-config", '{"x": 1}'])
    assert single.argv[-2:] == ["--additional-config", json.dumps(
        {"x": 1, "vllm_steer": {"steer_set_sha256": "d" * 64}})]
    for args in (["--api-server-count", "2"], ["--data-parallel-size", "2"], ["-asc", "3"],
                 ["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--headless"]):
        scaled = plan(args)
        assert scaled.argv == [*args, "--additional-config", json.dumps({"vllm_steer": {"steer_set_sha256": "d" * 64}})]
        assert not scaled.notes, args
    dp = plan(["--data-parallel-size", "2"], runtime_updates=True)
    assert dp.argv[-2:] == ["--api-server-count", "1"] and "one API server" in dp.notes[0]
    assert plan(["--distributed-executor-backend", "ray"]).uses_ray


REFUSED_WITH_RUNTIME_UPDATES = [
    (["--api-server-count", "2"], "--api-server-count 2"),
    (["--data-parallel-size", "2", "--api-server-count", "2"], "--api-server-count 2"),
    (["--data-parallel-size", "2", "--data-parallel-external-lb", "--data-parallel-rank", "0"],
     "--data-parallel-external-lb, --data-parallel-rank"),
    (["--data-parallel-size", "2", "--data-parallel-rank", "1"], "--data-parallel-rank"),
    (["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--data-parallel-start-rank", "0"],
     "--data-parallel-start-rank"),
    (["--data-parallel-size", "2", "--data-parallel-hybrid-lb", "--data-parallel-size-local", "1"],
     "--data-parallel-hybrid-lb"),
]


@pytest.mark.parametrize("vllm_args,named", REFUSED_WITH_RUNTIME_UPDATES)
def test_runtime_updates_refused_where_one_front_end_cannot_reach_every_engine(vllm_args, named, steers, capsys):
    """`vllm-steer serve --allow-runtime-updates` with several API servers or external/hybrid
    load balancing exits before vLLM starts, naming the flag and what to do instead."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["serve", "unused-model", "--steer", f"gamma={steers['gamma']}", "--allow-runtime-updates",
                  *vllm_args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "runtime steer loads (--allow-runtime-updates" in err and f"cannot be used with {named}" in err, err


def test_the_endpoint_plugin_refuses_too(monkeypatch):
    """Plain `vllm serve` users with VLLM_STEER_ALLOW_RUNTIME_UPDATES=1 get the same refusal when
    vLLM initialises the plugin's state in an API server (start-up stops), as vLLM refuses runtime
    LoRA updates with several API servers."""
    from types import SimpleNamespace

    # A stand-in for vLLM's engine client: only what init_state reads (the plugin's own front end is real).
    engine = SimpleNamespace(vllm_config=SimpleNamespace(model_config=SimpleNamespace(get_hidden_size=lambda: 256)),
                             get_tokenizer=lambda: None)
    plugin, state = registry.SteerEndpoints(), Namespace()
    monkeypatch.setenv(RUNTIME_UPDATES_ENV, "1")
    with pytest.raises(ValueError, match="cannot be used with --api-server-count 2"):
        asyncio.run(plugin.init_state(engine, state, Namespace(api_server_count=2, model="tiny")))
    with pytest.raises(ValueError, match="cannot be used with --data-parallel-hybrid-lb"):
        asyncio.run(plugin.init_state(engine, state, Namespace(data_parallel_hybrid_lb=True, model="tiny")))
    asyncio.run(plugin.init_state(engine, state, Namespace(api_server_count=None, data_parallel_size=2, model="tiny")))
    assert state.vllm_steer_engine is engine and state.vllm_steer_hidden_size == 256
    monkeypatch.delenv(RUNTIME_UPDATES_ENV)  # without runtime updates, any number of front ends
    asyncio.run(plugin.init_state(engine, state, Namespace(api_server_count=4, model="tiny")))


@pytest.fixture
def worker(steers, monkeypatch, tiny_model, worker_steering, fresh_front_end):
    """This process as a vLLM worker serving gamma on the tiny model (the legacy runner's processor,
    its table, the LM head): what collective_rpc reaches."""
    from types import SimpleNamespace

    from vllm_steer.plugin import SteerLogitsProcessor, register_plugin

    monkeypatch.setenv(ENV_VAR, SteerConfig({"gamma": str(steers["gamma"])}).to_json())
    register_plugin()
    config = stand_in_config(v2=False, max_num_seqs=4)
    config.model_config.get_hidden_size = lambda: 256
    proc = SteerLogitsProcessor(config, torch.device("cpu"), False)
    head = torch.nn.Module()
    head.weight = tiny_model[1].get_output_embeddings().weight.detach()
    head.shard_indices = SimpleNamespace(num_org_elements=49152, org_vocab_start_index=0)
    worker_steering.attach([], head, torch.device("cpu"), torch.float32)
    return proc


def rpc(method: str, *args: object) -> object:
    """A worker method as vLLM's collective_rpc calls it, on the worker (here: this process)."""
    from vllm.v1.worker.worker_base import WorkerBase

    return getattr(WorkerBase, f"vllm_steer_{method}")(None, *args)


def test_a_runtime_load_in_a_worker_needs_the_bytes_not_the_path(worker, worker_steering, steers, tmp_path):
    """The worker half of a load: the new steer arrives as its file's bytes (its path names a file
    this node does not have), is checked (fingerprint), prepared without touching the served
    table, and served only on commit, with the rows in flight carried over."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    worker.update_state(BatchUpdate(batch_size=2, removed=[], moved=[],
                                    added=[(0, SamplingParams(extra_args={"steer_gamma": 5}), None, []),
                                           (1, SamplingParams(extra_args=None), None, [])]))
    served = worker_steering.table
    nowhere = str(tmp_path / "not-on-this-node.safetensors")
    new = SteerConfig({"gamma": str(steers["gamma"]), "delta": nowhere})
    data = Path(steers["delta"]).read_bytes()
    assert rpc("prepare", "t1", new.to_json(), "delta", data)["steers"] == ["gamma", "delta"]
    assert worker_steering.table is served and "delta" not in served.bank.index  # nothing served yet
    rpc("discard", "t1")
    with pytest.raises(RuntimeError, match="no steer set prepared under t1"):
        rpc("commit", "t1")
    rpc("prepare", "t2", new.to_json(), "delta", data)
    gamma_row = served.host_values[0].clone()
    assert rpc("commit", "t2")["steers"] == ["gamma", "delta"]
    table = worker_steering.table
    assert table is not served and table.config.steers["delta"] == nowhere
    assert torch.equal(table.host_values[0], gamma_row) and int(table.host_steers[0, 0]) == table.bank.index["gamma"]
    assert table.steered[:2].tolist() == [True, False]
    # A steer whose fingerprint is another model's is refused in the worker, and nothing changes.
    stranger = SteerConfig({**new.steers, "stranger": nowhere})
    with pytest.raises(ValueError, match="does not fit this model's output embedding"):
        rpc("prepare", "t3", stranger.to_json(), "stranger", Path(steers["stranger"]).read_bytes())
    assert worker_steering.table is table
    with pytest.raises(RuntimeError, match="no steer set prepared under t3"):  # nothing was kept
        rpc("commit", "t3")


def test_a_pipeline_stage_without_logits_loads_nothing(steers, monkeypatch, worker_steering):
    """Only the last pipeline stage computes logits: a processor on another stage loads no steer,
    does nothing per step, and answers the registry's calls without checking anything."""
    from vllm.v1.sample.logits_processor import BatchUpdate

    from vllm_steer.plugin import SteerLogitsProcessor
    from vllm_steer.serving import processor

    monkeypatch.setenv(ENV_VAR, SteerConfig({"gamma": str(steers["gamma"])}).to_json())
    monkeypatch.setattr(processor, "pipeline_stage", lambda: (0, 2))
    proc = SteerLogitsProcessor(stand_in_config(v2=False), torch.device("cpu"), False)
    assert worker_steering.table is None and worker_steering.idle_stage == "pipeline stage 1 of 2"
    assert not proc.active
    proc.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[(0, None, None, [])]))  # not read
    assert worker_steering._armed is None  # nothing armed for a step
    h = torch.randn(1, 256)
    with worker_steering.sampling():  # nothing armed, nothing steered
        assert worker_steering.steer_sampling_rows(h) is h
    assert rpc("prepare", "t", "{not json", "x", b"") == {"stage": "pipeline stage 1 of 2"}
    assert rpc("commit", "t") == {"stage": "pipeline stage 1 of 2"}


class FakeEngines:
    """The front end's engine client as the registry sees it: collective_rpc to every engine (under
    data parallelism vLLM's client gathers them and raises if any raised); `refuse` makes one
    engine refuse a method."""

    def __init__(self, refuse: dict[str, str] | None = None) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.refuse = refuse or {}

    async def collective_rpc(self, method: str, args: tuple = ()) -> list:
        self.calls.append((method, args))
        if method in self.refuse:
            raise RuntimeError(self.refuse[method])
        return [{}]


@pytest.fixture
def front_end(steers, monkeypatch, fresh_front_end):
    monkeypatch.setenv(RUNTIME_UPDATES_ENV, "1")
    admit(SteerConfig({"gamma": str(steers["gamma"])}, max_load_bytes=2**20,
                      load_dirs=(str(Path(steers["delta"]).parent),)).with_headers())
    app = FastAPI()
    registry.SteerEndpoints().attach_router(app)
    app.state.vllm_steer_hidden_size = 256  # what init_state reads from the engine's config
    return app


def worker_error(message: str, check: str | None = None) -> str:
    """A worker's exception as vLLM's collective_rpc re-raises it in the front end, tagged as a worker tags a
    refusal of a runtime load."""
    from vllm_steer.serving.worker import REFUSAL_TAG

    return f"Worker failed with error '{message}{' ' + REFUSAL_TAG.format(check) if check else ''}'"


def test_a_load_changes_every_engine_or_none(front_end, steers):
    """The front-end half: prepare everywhere, commit only if every engine prepared; one engine's
    refusal discards the others' (the answer's "nothing changed" is true); a commit failure after
    every engine accepted says the engines may differ; the front end admits the steer only once
    every engine serves it; a file over the size bound never leaves the front end."""
    body = {"name": "delta", "path": str(steers["delta"])}
    with TestClient(front_end) as http:
        refusal = worker_error("engine 1: row 3 norm 1.25 != 2.5", "it does not fit this model's output embedding")
        front_end.state.vllm_steer_engine = engines = FakeEngines({"vllm_steer_prepare": refusal})
        r = http.post("/v1/load_steer", json=body)
        assert r.status_code == 400 and "nothing changed" in r.text, r.text
        assert "it does not fit this model's output embedding" in r.text and "norm" not in r.text
        (prepare, (token, config_json, name, data)), (discard, (discarded,)) = engines.calls
        assert (prepare, discard, discarded, name) == ("vllm_steer_prepare", "vllm_steer_discard", token, "delta")
        assert type(data) is bytes and data == Path(steers["delta"]).read_bytes()
        assert set(json.loads(config_json)["steers"]) == {"gamma", "delta"}
        assert list(admitted().config.steers) == ["gamma"]

        front_end.state.vllm_steer_engine = engines = FakeEngines({"vllm_steer_commit": "worker died"})
        r = http.post("/v1/load_steer", json=body)
        assert r.status_code == 500 and "may now serve different steer sets" in r.text
        assert list(admitted().config.steers) == ["gamma"]

        front_end.state.vllm_steer_engine = engines = FakeEngines()
        assert http.post("/v1/load_steer", json=body).status_code == 200
        assert [m for m, _ in engines.calls] == ["vllm_steer_prepare", "vllm_steer_commit"]
        assert list(admitted().config.steers) == ["gamma", "delta"]
        assert http.post("/v1/unload_steer", json={"name": "delta"}).status_code == 200
        assert list(admitted().config.steers) == ["gamma"]

        big = Path(steers["delta"]).parent / "big.safetensors"
        big.write_bytes(b"\0" * (2**20 + 1))
        engines.calls.clear()
        r = http.post("/v1/load_steer", json={"name": "big", "path": str(big)})
        assert r.status_code == 413 and "larger than the 1 MiB a runtime load accepts" in r.text and not engines.calls
        # A worker's error that is not a tagged refusal is not passed on: it may quote anything.
        front_end.state.vllm_steer_engine = FakeEngines({"vllm_steer_prepare": worker_error("SECRET in a trace")})
        r = http.post("/v1/load_steer", json=body)
        assert r.status_code == 400 and "a worker refused it" in r.text and "SECRET" not in r.text


# ---------------------------------------------------------------------------- helpers for the engine tests


def load(server: ServerProcess, name: str, path: Path) -> httpx.Response:
    return httpx.post(server.url + "/load_steer", json={"name": name, "path": str(path)}, timeout=300)


def listed(server: ServerProcess) -> list[str]:
    return [s["name"] for s in httpx.get(server.url + "/steers", timeout=30).json()["data"]]


def log_lines(server: ServerProcess, *needles: str) -> list[str]:
    return [line for line in server.log_tail(5_000_000).splitlines() if all(n in line for n in needles)]


def exit_log(proc: ServerProcess, timeout: float = 600) -> str:
    """For a server that must refuse to start: its log, once it has exited non-zero."""
    try:
        assert proc.wait_exit(timeout=timeout) != 0
    finally:
        proc.stop()
    return proc.log_tail(300_000)


def tiny_steer_server(tiny_model, steers, log: Path, *args: str, env: dict | None = None) -> ServerProcess:
    return ServerProcess(steer_server_command(str(tiny_model[0]), {"gamma": str(steers["gamma"])}, *CPU_SERVER_ARGS,
                                              *args), log, env=env or SERVER_ENV)


def plain_steered_server(tiny_model, config: SteerConfig, log: Path, *args: str) -> ServerProcess:
    """vLLM's own server module with the plugin configured by hand, as a plain `vllm serve` user
    (or a worker on a node with another environment) would have it."""
    return ServerProcess(plain_server_command(str(tiny_model[0]), "--logits-processors", STATE_PROCESSOR,
                                              *CPU_SERVER_ARGS, "--enforce-eager", *args), log,
                         env={**SERVER_ENV, ENV_VAR: config.to_json()})


# ---------------------------------------------------------------------------- pipeline parallelism (+ refusals)

RAY_REFUSAL = "current platform cpu does not support ray"  # vLLM's CPU build, with Ray installed
RAY_MISSING = "Failed to import Ray: No module named 'ray'"  # vLLM's CPU build, without Ray


@pytest.fixture(scope="module")
def pp(tiny_model, steers, tmp_path_factory):
    """The PP=2 server, and the servers that must refuse to start beside it."""
    logs = tmp_path_factory.mktemp("pp_logs")
    gamma = SteerConfig({"gamma": str(steers["gamma"])})
    sha = {n: s for n, (_, s) in gamma.read_files().items()}
    stale = SteerConfig({"gamma": str(steers["gamma"])}, bounds={"gamma": 7.0})
    procs = {
        "pp": tiny_steer_server(tiny_model, steers, logs / "pp.log", "--pipeline-parallel-size", "2",
                                "--distributed-executor-backend", "mp", "--allow-runtime-updates",
                                *load_dir_args(tmp_path_factory), env=TWO_PROCESS_ENV),
        # Refused at start-up (each in its own processes, started now to share the wait):
        # the Ray executor; a worker whose steer set is not the front end's (its environment says
        # gamma, the front end started with gamma bounded at 7); a worker that cannot read a path.
        "ray": tiny_steer_server(tiny_model, steers, logs / "ray.log", "--tensor-parallel-size", "2",
                                 "--distributed-executor-backend", "ray", "--enforce-eager",
                                 env={**TWO_PROCESS_ENV, "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY": "OPERATOR_VAR"}),
        "stale": plain_steered_server(tiny_model, gamma, logs / "stale.log", "--additional-config", json.dumps(
            {"vllm_steer": {"steer_set_sha256": steer_set_digest(stale, sha)}})),
        "unreadable": plain_steered_server(tiny_model, SteerConfig({"gone": "/nonexistent/gone.safetensors"}),
                                           logs / "unreadable.log"),
    }
    for proc in procs.values():
        proc.start()
    try:
        procs["pp"].wait_ready(timeout=900)
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@two_cores
class TestPipelineParallel:
    """PP=2 over two processes (mp executor). torch.compile on: vLLM's CPU build only allocates the
    buffer the second stage receives activations in during its compiled warm-up."""

    def test_the_last_stage_steers_exactly(self, pp, tiny_model):
        """Requests one at a time and all at once: the float64 formula; the per-request table of the
        last stage follows the batch."""
        _, model, steer, _ = tiny_model
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tiny_model[0])
        for concurrently in (False, True):
            worst, effect = served_vs_formula(pp["pp"], model, tokenizer, {"gamma": steer}, GAMMA_CASES,
                                              concurrently=concurrently)
            print(f"PP=2, concurrently={concurrently}: max |logprob - formula| {worst:.1e}, effect >= {effect:.2f}")
            assert worst < 1e-3, f"PP=2 vs the float64 formula (concurrently={concurrently}): {worst}"
            assert effect > 0.1, effect

    def test_only_the_last_stage_loads_steers(self, pp):
        server = pp["pp"]
        assert len(log_lines(server, "vllm-steer: pipeline stage 1 of 2 computes no logits")) == 1
        loads = log_lines(server, "vllm-steer: loaded 1 steers")
        assert len(loads) == 1 and "pipeline stage 2 of 2 (the last" in loads[0], loads
        # The steer set check ran where the steers are, once, and matched.
        assert len(log_lines(server, "the one the front end started with", HOST)) == 1
        assert not log_lines(server, "Worker_PP0", "vllm-steer")

    def test_a_runtime_load_reaches_the_last_stage(self, pp, tiny_model, steers):
        from transformers import AutoTokenizer

        server = pp["pp"]
        assert load(server, "delta", steers["delta"]).status_code == 200
        worst, effect = served_vs_formula(server, tiny_model[1], AutoTokenizer.from_pretrained(tiny_model[0]),
                                          loaded(steers, "gamma", "delta"), DELTA_CASES, prompts=PROMPTS[:2])
        print(f"PP=2 after a runtime load: max |logprob - formula| {worst:.1e}, effect >= {effect:.2f}")
        assert worst < 1e-3 and effect > 0.1, (worst, effect)
        r = load(server, "stranger", steers["stranger"])
        assert r.status_code == 400 and "does not fit" in r.text and "nothing changed" in r.text, r.text
        assert httpx.post(server.url + "/unload_steer", json={"name": "delta"}, timeout=300).status_code == 200
        assert listed(server) == ["gamma"]
        # Stage 1 was asked too, and answered without checking anything (no fingerprint warning).
        assert not log_lines(server, "LM head is not a plain")
        assert not log_lines(server, "Worker_PP0", "vllm-steer")

    def test_the_ray_executor_is_refused_by_vllms_cpu_build(self, pp):
        """vLLM 0.32's CPU platform has no Ray device key, so its Ray executors refuse to start (after
        starting Ray). Without Ray installed, vLLM refuses earlier, asking for it. Either way vllm-steer
        serve first named its variables for Ray to copy, after the operator's."""
        log = exit_log(pp["ray"])
        ray_installed = importlib.util.find_spec("ray") is not None
        assert (RAY_REFUSAL if ray_installed else RAY_MISSING) in log, log[-3000:]
        assert (f"VLLM_RAY_EXTRA_ENV_VARS_TO_COPY=OPERATOR_VAR,{','.join(STEER_ENV_VARS)}"
                in log), log[:3000]

    def test_a_worker_with_another_steer_set_refuses_to_start(self, pp):
        log = exit_log(pp["stale"])
        assert "the steer set this worker (node" in log and "is not the one the front end started with" in log, \
            log[-3000:]
        assert HOST in log

    def test_a_worker_that_cannot_read_a_path_names_its_node(self, pp):
        log = exit_log(pp["unreadable"])
        assert "steer file not found or unreadable: /nonexistent/gone.safetensors" in log, log[-3000:]
        assert f"on node {HOST}" in log


# ---------------------------------------------------------------------------- data parallelism


# The DP server and the two-API-server one start one after the other: side by side on two cores they took
# longer (57 s) than in turn (25 s + 24 s).
@pytest.fixture(scope="module")
def dp(tiny_model, steers, tmp_path_factory):
    log = tmp_path_factory.mktemp("dp_logs") / "dp.log"
    with tiny_steer_server(tiny_model, steers, log, "--data-parallel-size", "2", "--enforce-eager",
                           "--allow-runtime-updates", *load_dir_args(tmp_path_factory), env=TWO_PROCESS_ENV) as server:
        yield server


@pytest.fixture(scope="module")
def api2(tiny_model, steers, tmp_path_factory):
    log = tmp_path_factory.mktemp("api2_logs") / "api2.log"
    with tiny_steer_server(tiny_model, steers, log, "--api-server-count", "2", "--enforce-eager",
                           "--enable-log-requests", "--steer-endpoints") as server:
        yield server


@two_cores
class TestDataParallel:
    """DP=2 behind one API server (internal load balancing): two engine cores, each with its own
    worker and steer table."""

    def engine_counts(self, server: ServerProcess) -> list[float]:
        return [metric(server, "vllm:request_success_total", engine=e) for e in ("0", "1")]

    def test_two_engines_behind_one_front_end(self, dp):
        assert "one API server (--api-server-count 1) reaching all engines" in dp.log_tail(5_000_000)
        assert len(log_lines(dp, "vllm-steer: loaded 1 steers")) == 2
        assert len(log_lines(dp, "the one the front end started with")) == 2

    def test_each_engine_steers_its_own_requests(self, dp, tiny_model):
        from transformers import AutoTokenizer

        before, admitted = self.engine_counts(dp), metric(dp, "vllm_steer_requests_total", steer="gamma")
        worst, effect = served_vs_formula(dp, tiny_model[1], AutoTokenizer.from_pretrained(tiny_model[0]),
                                          {"gamma": tiny_model[2]}, GAMMA_CASES * 2, concurrently=True)
        served = [a - b for a, b in zip(self.engine_counts(dp), before, strict=True)]
        print(f"DP=2: max |logprob - formula| {worst:.1e}, effect >= {effect:.2f}, requests per engine {served}")
        assert worst < 1e-3 and effect > 0.1, (worst, effect)
        assert min(served) > 0 and sum(served) == 18, served  # both engines served some
        assert metric(dp, "vllm_steer_requests_total", steer="gamma") - admitted == 12

    def test_a_runtime_load_and_unload_reach_every_engine(self, dp, tiny_model, steers):
        from transformers import AutoTokenizer

        assert load(dp, "delta", steers["delta"]).status_code == 200
        before = self.engine_counts(dp)
        worst, effect = served_vs_formula(dp, tiny_model[1], AutoTokenizer.from_pretrained(tiny_model[0]),
                                          loaded(steers, "gamma", "delta"), DELTA_CASES * 2, concurrently=True)
        served = [a - b for a, b in zip(self.engine_counts(dp), before, strict=True)]
        print(f"DP=2 after a runtime load: max |logprob - formula| {worst:.1e}, effect >= {effect:.2f}, "
              f"requests per engine {served}")
        assert worst < 1e-3 and effect > 0.1 and min(served) > 0, (worst, effect, served)
        assert not log_lines(dp, "served UNSTEERED")
        # Refused by every engine: 400, and nothing changed anywhere.
        r = load(dp, "stranger", steers["stranger"])
        assert r.status_code == 400 and "does not fit" in r.text and "nothing changed" in r.text, r.text
        assert listed(dp) == ["gamma", "delta"]
        assert httpx.post(dp.url + "/unload_steer", json={"name": "delta"}, timeout=300).status_code == 200
        refused = httpx.post(dp.url + "/completions", timeout=60, json={
            "model": str(tiny_model[0]), "prompt": "x", "max_tokens": 1, "vllm_xargs": {"steer_delta": 1}})
        assert refused.status_code == 400 and "unknown steer 'delta'" in refused.text
        worst, _ = served_vs_formula(dp, tiny_model[1], AutoTokenizer.from_pretrained(tiny_model[0]),
                                     {"gamma": tiny_model[2]}, GAMMA_CASES * 2, concurrently=True)
        assert worst < 1e-3


# ---------------------------------------------------------------------------- two API servers


class TestTwoApiServers:
    """`--api-server-count 2`: vLLM's dispatcher starts two API server processes on one port, both
    connected to the engine core; each admits requests against the same static steer set."""

    def test_two_front_ends_steer_exactly(self, api2, tiny_model):
        from transformers import AutoTokenizer

        assert log_lines(api2, "Started 2 API server processes")
        assert log_lines(api2, "(ApiServer_0") and log_lines(api2, "(ApiServer_1")
        worst, effect = served_vs_formula(api2, tiny_model[1], AutoTokenizer.from_pretrained(tiny_model[0]),
                                          {"gamma": tiny_model[2]}, GAMMA_CASES)
        print(f"2 API servers: max |logprob - formula| {worst:.1e}, effect >= {effect:.2f}")
        assert worst < 1e-3 and effect > 0.1, (worst, effect)
        assert listed(api2) == ["gamma"]

    def test_metrics_are_summed_across_front_ends(self, api2, tiny_model):
        """Steered requests on fresh connections until both API servers have admitted some (each
        logs the requests it adds, --enable-log-requests); every /metrics read, whichever server answers it, counts
        them all."""
        before = metric(api2, "vllm_steer_requests_total", steer="gamma")

        async def batch(n: int) -> None:
            async def one(i: int) -> None:
                async with httpx.AsyncClient(timeout=120) as http:  # a connection of its own
                    r = await http.post(api2.url + "/completions", json={
                        "model": str(tiny_model[0]), "prompt": PROMPTS[i % 3], "max_tokens": 2,
                        "vllm_xargs": {"steer_gamma": i % 5}})
                    assert r.status_code == 200, r.text

            await asyncio.gather(*(one(i) for i in range(n)))

        def admitted_by_each() -> list[int]:
            return [len(log_lines(api2, f"(ApiServer_{i}", "Added request")) for i in (0, 1)]

        start, sent = admitted_by_each(), 0
        for _ in range(6):
            asyncio.run(batch(8))
            sent += 8
            per_server = [a - b for a, b in zip(admitted_by_each(), start, strict=True)]
            if min(per_server) > 0:
                break
            time.sleep(1)
        assert min(per_server) > 0 and sum(per_server) == sent, f"requests per API server: {per_server}"
        reads = [metric(api2, "vllm_steer_requests_total", steer="gamma") - before for _ in range(6)]
        print(f"2 API servers: {sent} steered requests, admitted per server {per_server}, /metrics reads {reads}")
        assert reads == [sent] * 6, (reads, per_server)
        with pytest.raises(Exception, match="unknown steer"):
            complete(api2, PROMPTS[0], {"steer_nope": 1}, max_tokens=1)
