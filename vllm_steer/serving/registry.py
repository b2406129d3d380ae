"""The runtime steer registry's HTTP routes, in the API front end: GET /v1/steers, POST /v1/load_steer and
/v1/unload_steer, and the two-phase change they drive in every worker (the worker half is
`WorkerSteering.prepare` / `commit` / `discard`, reached through collective_rpc).

A change of the steer set is two-phase, so that every engine core and worker of the server (tensor,
pipeline and data parallel) changes or none does: the front end sends the new set (and a loaded
steer's file bytes, read and checked once in the front end, so no worker needs the file on its
node) to every worker to prepare; only when all of them accepted does it commit, else it discards.
The front end admits requests naming a new steer only after the commit, and refuses requests
naming an unloaded steer before the workers drop it."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from vllm_steer.log import logger
from vllm_steer.steer.file import SteerFile, SteerFileError

from .config import SteerConfig, runtime_updates_allowed
from .front_end import admit, admitted
from .scale_out import runtime_updates_refusal
from .vllm_internals import check_internals
from .worker import RPC_PREFIX

_REGISTRY_LOCK = asyncio.Lock()


def describe_steers(config: SteerConfig, bounds: dict[str, float]) -> list[dict]:
    """What GET /v1/steers lists: each served steer's header and bound."""
    return [{"name": name, "path": config.steers[name], "dim_names": list(h.dim_names), "primary_dim": h.primary_dim,
             "bias_dims": h.bias_dims, "epsilon": h.epsilon, "rank": h.rank, "hidden_size": h.hidden_size,
             "base_model": h.base_model, "max_abs_value": bounds[name],
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
        await engine.collective_rpc(RPC_PREFIX + "prepare", args=(token, new.to_json(), added, data))
    except Exception:
        await engine.collective_rpc(RPC_PREFIX + "discard", args=(token,))
        raise
    try:
        await engine.collective_rpc(RPC_PREFIX + "commit", args=(token,))
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
            steers = admitted()
            return {"object": "list", "data": describe_steers(steers.config, steers.bounds)}

        if runtime_updates_allowed():

            @router.post("/v1/load_steer")
            async def load_steer(body: LoadSteerRequest, raw: Request):
                async with _REGISTRY_LOCK:
                    current = admitted().config
                    try:
                        current.with_steer(body.name, body.path, None, body.max_abs_value)  # name, duplicate, bound
                        data = await asyncio.to_thread(read_steer_upload, body.path, current.max_load_bytes)
                        # Format, shapes, NaN: checked here, once, before any worker sees the bytes.
                        steer = SteerFile.from_bytes(data, where=body.path)
                        new = current.with_steer(body.name, body.path, steer.header, body.max_abs_value)
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
                    admit(new)
                    return {"loaded": body.name, "steers": list(new.steers)}

            @router.post("/v1/unload_steer")
            async def unload_steer(body: UnloadSteerRequest, raw: Request):
                async with _REGISTRY_LOCK:
                    current = admitted().config
                    if body.name not in current.steers:
                        return error(404, f"no steer named {body.name!r} is loaded")
                    new = current.without_steer(body.name)
                    # The front end first: from now on requests naming it are refused; requests
                    # already admitted keep it until they finish.
                    admit(new)
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
