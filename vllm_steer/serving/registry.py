"""The runtime steer registry: GET /v1/steers, POST /v1/load_steer and /v1/unload_steer in the API
front end, and their engine half, run in every worker through collective_rpc.

A change of the steer set is two-phase, so that every engine core and worker of the server (tensor,
pipeline and data parallel) changes or none does: the front end sends the new set (and a loaded
steer's file bytes, read and checked once in the front end, so no worker needs the file on its
node) to every worker to prepare; only when all of them accepted does it commit, else it discards.
The front end admits requests naming a new steer only after the commit, and refuses requests
naming an unloaded steer before the workers drop it."""

from __future__ import annotations

import asyncio
import socket
import uuid
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from vllm_steer.steer.file import SteerFile, SteerFileError
from vllm_steer.steer.fingerprint import check_fits_model

from .config import SteerConfig, runtime_updates_allowed, served_config, set_served_config
from .step import STEP, logger
from .table import SteerTable
from .vllm_internals import check_internals

# The worker methods collective_rpc names (installed on vLLM's WorkerBase by compat.py).
PREPARE_METHOD = "vllm_steer_prepare"
COMMIT_METHOD = "vllm_steer_commit"
DISCARD_METHOD = "vllm_steer_discard"


@dataclass
class _Prepared:
    token: str
    table: SteerTable


_PREPARED: _Prepared | None = None


def prepare_worker(worker: object, token: str, config_json: str, added: str | None = None,
                   data: bytes | None = None) -> dict:
    """Phase one, in every worker: build (but do not serve) the table for the steer set
    `config_json`, with the steer `added` parsed from its file's `data`. Raises, changing nothing,
    if the steer does not fit the model (hidden size, fingerprint: refused by every tensor-parallel
    rank together) or the set would exceed the memory budget."""
    global _PREPARED
    table = STEP.table
    if table is None:
        if STEP.idle_stage is not None:  # a pipeline stage without logits steers nothing
            return {"stage": STEP.idle_stage}
        raise RuntimeError("vllm-steer is not active in this worker (no SteerLogitsProcessor)")
    served = SteerConfig.from_json(config_json)
    files: dict[str, SteerFile] = {}
    if added is not None:
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"steer {added!r}: expected the file's bytes, got {type(data).__name__}")
        where = f"steer {added!r} ({served.steers.get(added, 'sent by the front end')}, received on node " \
                f"{socket.gethostname()})"
        steer = SteerFile.from_bytes(data, where=where)
        check_fits_model(steer.header, table.bank.hidden_size, where)
        files[added] = steer
    STEP.check_fingerprints({n: f.header for n, f in files.items()}, served.steers)
    new_table = table.with_steers(served, files)
    STEP.place(new_table)  # the memory budget is checked where the steers are served
    _PREPARED = _Prepared(token, new_table)
    return {"prepared": token, "steers": list(new_table.bank.names)}


def commit_worker(worker: object, token: str) -> dict:
    """Phase two: serve the prepared table from the next step on, carrying over every request in
    flight (rows may have changed since phase one)."""
    global _PREPARED
    if STEP.table is None and STEP.idle_stage is not None:
        return {"stage": STEP.idle_stage}
    prepared = _PREPARED
    if prepared is None or prepared.token != token:
        raise RuntimeError(f"vllm-steer: no steer set prepared under {token} in this worker")
    prepared.table.carry_rows_from(STEP.table)
    STEP.table, _PREPARED = prepared.table, None
    return {"steers": list(STEP.table.bank.names), "retired": list(STEP.table.retired)}


def discard_worker(worker: object, token: str) -> None:
    """Drop a prepared table (another worker refused it). Idempotent."""
    global _PREPARED
    if _PREPARED is not None and _PREPARED.token == token:
        _PREPARED = None


WORKER_METHODS = {PREPARE_METHOD: prepare_worker, COMMIT_METHOD: commit_worker, DISCARD_METHOD: discard_worker}


def runtime_updates_refusal(args: Namespace) -> str | None:
    """Why runtime loads and unloads cannot be served with these vLLM arguments, or None. Each API
    server keeps its own list of admitted steers, and with external or hybrid data-parallel load
    balancing each front end reaches only its own engines: a load through one would leave the
    others admitting a different set (vLLM refuses runtime LoRA updates with several API servers
    for the same reason)."""
    count = getattr(args, "api_server_count", None)
    if count is not None and count > 1:
        return (f"runtime steer loads (--allow-runtime-updates, {RUNTIME_FLAG}) cannot be used with "
                f"--api-server-count {count}: each API server keeps its own list of admitted steers, so a load "
                "through one would leave the others refusing the new steer and admitting unloaded ones. Run one API "
                "server (--api-server-count 1; with --data-parallel-size N one API server still reaches all N "
                "engines), or serve a fixed steer set without --allow-runtime-updates.")
    modes = [flag for flag, on in (
        ("--data-parallel-external-lb", getattr(args, "data_parallel_external_lb", False)),
        ("--data-parallel-rank", getattr(args, "data_parallel_rank", None) is not None),
        ("--data-parallel-hybrid-lb", getattr(args, "data_parallel_hybrid_lb", False)),
        ("--data-parallel-start-rank", getattr(args, "data_parallel_start_rank", None) is not None),
        ("--data-parallel-multi-port-external-lb", getattr(args, "data_parallel_multi_port_external_lb", False)),
    ) if on]
    if modes:
        return (f"runtime steer loads (--allow-runtime-updates, {RUNTIME_FLAG}) cannot be used with "
                f"{', '.join(modes)}: with external or hybrid data-parallel load balancing each front end reaches "
                "only its own engines, so a load through one would leave the other engines without the steer while "
                "their front ends admit different sets. Serve a fixed steer set there (restart every node with the "
                "new --steer list to change it), or use internal load balancing (one API server, "
                "--data-parallel-size N), where one load reaches every engine.")
    return None


RUNTIME_FLAG = "VLLM_STEER_ALLOW_RUNTIME_UPDATES=1"
_REGISTRY_LOCK = asyncio.Lock()


def describe_steers(config: SteerConfig) -> list[dict]:
    """What GET /v1/steers lists: each served steer's header and bound."""
    return [{"name": name, "path": config.steers[name], "dim_names": list(h.dim_names), "primary_dim": h.primary_dim,
             "bias_dims": h.bias_dims, "epsilon": h.epsilon, "rank": h.rank, "hidden_size": h.hidden_size,
             "base_model": h.base_model, "max_abs_value": config.value_bounds[name],
             "fingerprint": h.fingerprint is not None, "parameters": 2 * h.num_dims * h.hidden_size * h.rank}
            for name, h in config.catalog.items()]


def read_steer_upload(path: str, limit: int) -> bytes:
    """A steer file's bytes for a runtime load, at most `limit` bytes (they travel to every worker)."""
    size = Path(path).stat().st_size
    if size > limit:
        raise SteerFileError(f"{path}: {size / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB a runtime load "
                             "accepts (--max-load-size): its bytes are sent to every worker")
    return Path(path).read_bytes()


async def change_steer_set(engine, new: SteerConfig, added: str | None = None, data: bytes | None = None) -> None:
    """Serve `new` in every worker of every engine core, or in none: prepare everywhere, then commit;
    if any worker refuses, the others discard what they prepared and the error is raised."""
    token = uuid.uuid4().hex
    try:
        await engine.collective_rpc(PREPARE_METHOD, args=(token, new.to_json(), added, data))
    except Exception:
        await engine.collective_rpc(DISCARD_METHOD, args=(token,))
        raise
    try:
        await engine.collective_rpc(COMMIT_METHOD, args=(token,))
    except Exception as e:  # every worker accepted the set a moment ago: this is not expected
        raise PartialCommitError(str(e)) from e


class PartialCommitError(RuntimeError):
    """Every worker prepared the new steer set but committing it failed somewhere."""


class LoadSteerRequest(BaseModel):
    name: str
    path: str
    max_abs_value: float | None = None


class UnloadSteerRequest(BaseModel):
    name: str


class SteerEndpoints:
    """The `vllm.endpoint_plugins` entry point (loaded only when VLLM_PLUGINS names
    vllm_steer): GET /v1/steers always; POST /v1/load_steer and /v1/unload_steer only with
    VLLM_STEER_ALLOW_RUNTIME_UPDATES=1, as vLLM gates runtime LoRA updates, and only with one API
    server and internal load balancing (refused at start-up otherwise)."""

    name = "vllm_steer"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        def error(status: int, message: str) -> JSONResponse:
            kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
            return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

        router = APIRouter()

        @router.get("/v1/steers")
        async def list_steers() -> dict:
            return {"object": "list", "data": describe_steers(served_config())}

        if runtime_updates_allowed():

            @router.post("/v1/load_steer")
            async def load_steer(body: LoadSteerRequest, raw: Request):
                async with _REGISTRY_LOCK:
                    current = served_config()
                    try:
                        current.with_steer(body.name, body.path, body.max_abs_value)  # name, duplicate, bound
                        data = await asyncio.to_thread(read_steer_upload, body.path, current.max_load_bytes)
                        # Format, shapes, NaN: checked here, once, before any worker sees the bytes.
                        steer = SteerFile.from_bytes(data, where=body.path)
                        new = current.with_steer(body.name, body.path, body.max_abs_value, steer.header)
                        new.value_bounds  # noqa: B018 (checks the new steer's bound)
                    except (ValueError, OSError) as e:
                        return error(400, f"cannot load steer {body.name!r}: {e}")
                    try:
                        await change_steer_set(raw.app.state.vllm_steer_engine, new, body.name, data)
                    except PartialCommitError as e:
                        logger.error("vllm-steer: loading %r: every worker prepared it, but committing failed: %s",
                                     body.name, e)
                        return error(500, f"loading steer {body.name!r}: every worker accepted it, but switching to "
                                          f"it failed in at least one ({e}); the workers may now serve different steer "
                                          f"sets while this front end still admits only {sorted(current.steers)}. "
                                          f"Unload {body.name!r} and load it again, or restart the server.")
                    except Exception as e:  # a worker refused it (hidden size, fingerprint, budget): nothing changed
                        return error(400, f"cannot load steer {body.name!r}: {e} (nothing changed: every engine "
                                          "and worker still serves the steers it served before)")
                    set_served_config(new)
                    return {"loaded": body.name, "steers": list(new.steers)}

            @router.post("/v1/unload_steer")
            async def unload_steer(body: UnloadSteerRequest, raw: Request):
                async with _REGISTRY_LOCK:
                    current = served_config()
                    if body.name not in current.steers:
                        return error(404, f"no steer named {body.name!r} is loaded")
                    new = current.without_steer(body.name)
                    # The front end first: from now on requests naming it are refused; requests
                    # already admitted keep it until they finish.
                    set_served_config(new)
                    try:
                        await change_steer_set(raw.app.state.vllm_steer_engine, new)
                    except Exception as e:
                        logger.error("vllm-steer: unloading %r: the workers kept it: %s", body.name, e)
                        return error(500, f"steer {body.name!r} is no longer admitted, but the workers could not drop "
                                          f"its weights ({e}); they keep serving it to requests admitted before")
                    return {"unloaded": body.name, "steers": list(new.steers)}

        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        check_internals("registry")
        if runtime_updates_allowed() and (refusal := runtime_updates_refusal(args)):
            raise ValueError(f"vllm-steer: {refusal}")
        state.vllm_steer_engine = engine_client
