"""The runtime steer registry: GET /v1/steers, POST /v1/load_steer and /v1/unload_steer in the API
front end, and their engine half, run in every worker through collective_rpc."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from vllm_steer.steer.file import SteerFile

from .config import SteerConfig, runtime_updates_allowed, served_config, set_served_config
from .step import STEP, check_memory_budget
from .table import load_fitting_steers

# The worker method collective_rpc names (installed on vLLM's WorkerBase by compat.py).
WORKER_METHOD = "vllm_steer_reconfigure"


def reconfigure_worker(worker: object, config_json: str) -> dict:
    """The worker half of load/unload, run in every worker through collective_rpc between
    engine steps: serve the new steer set from the next step on. Raises (and changes
    nothing) if an added steer does not fit the model."""
    table = STEP.table
    if table is None:
        raise RuntimeError("vllm-steer is not active in this worker (no SteerLogitsProcessor)")
    served = SteerConfig.from_json(config_json)
    added = [n for n in served.steers if n not in table.files]
    files = load_fitting_steers(served, added, table.bank.hidden_size)
    STEP.check_fingerprints(served, added)
    new_table = table.reconfigured(served, files)
    check_memory_budget(new_table.bank, served.memory_budget)  # before anything changes
    STEP.table = new_table
    if STEP.placement is not None:
        STEP.place_table()
    return {"steers": list(STEP.table.files), "retired": list(STEP.table.retired)}


_REGISTRY_LOCK = asyncio.Lock()


def describe_steers(config: SteerConfig) -> list[dict]:
    """What GET /v1/steers lists: each served steer's header and bound."""
    return [{"name": name, "path": config.steers[name], "dim_names": list(h.dim_names), "primary_dim": h.primary_dim,
             "bias_dims": h.bias_dims, "epsilon": h.epsilon, "rank": h.rank, "hidden_size": h.hidden_size,
             "base_model": h.base_model, "max_abs_value": config.value_bounds[name],
             "fingerprint": h.fingerprint is not None, "parameters": 2 * h.num_dims * h.hidden_size * h.rank}
            for name, h in config.catalog.items()]


class LoadSteerRequest(BaseModel):
    name: str
    path: str
    max_abs_value: float | None = None


class UnloadSteerRequest(BaseModel):
    name: str


class SteerEndpoints:
    """The `vllm.endpoint_plugins` entry point (loaded only when VLLM_PLUGINS names
    vllm_steer): GET /v1/steers always; POST /v1/load_steer and /v1/unload_steer only with
    VLLM_STEER_ALLOW_RUNTIME_UPDATES=1, as vLLM gates runtime LoRA updates."""

    name = "vllm_steer"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        def error(status: int, message: str) -> JSONResponse:
            return JSONResponse({"error": {"message": message, "type": "BadRequestError" if status == 400
                                           else "NotFoundError", "code": status}}, status_code=status)

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
                        new = current.with_steer(body.name, body.path, body.max_abs_value)
                        SteerFile.load(new.steers[body.name])  # shapes, NaN, format: before any worker sees it
                        new.value_bounds  # noqa: B018 (reads the header, checks the bound)
                    except (ValueError, OSError) as e:
                        return error(400, f"cannot load steer {body.name!r}: {e}")
                    try:
                        await raw.app.state.vllm_steer_engine.collective_rpc(
                            WORKER_METHOD, args=(new.to_json(),))
                    except Exception as e:  # the workers refused it (hidden size, fingerprint): nothing changed
                        return error(400, f"cannot load steer {body.name!r}: {e}")
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
                    await raw.app.state.vllm_steer_engine.collective_rpc(
                        WORKER_METHOD, args=(new.to_json(),))
                    return {"unloaded": body.name, "steers": list(new.steers)}

        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        state.vllm_steer_engine = engine_client
