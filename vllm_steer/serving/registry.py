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
import hmac
import os
import re
import uuid
from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel

from vllm_steer.log import logger
from vllm_steer.steer.file import SteerFileError
from vllm_steer.steer.fingerprint import check_fits_model
from vllm_steer.steer.values import SteerRequestError
from vllm_steer.tools.keywords import is_readable_word

from .config import UPLOADED, SteerConfig, playground_served, resolved_roots, runtime_updates_allowed
from .front_end import admit, admitted
from .load_sources import LoadRefused, LoadSource, parse_steer, read_path, read_upload
from .presets import PresetRequests, check_presets, model_cards, preset_clash, served_names
from .scale_out import runtime_updates_refusal
from .vllm_internals import check_internals, steers_configured
from .worker import REFUSAL_TAG, RPC_PREFIX

_REGISTRY_LOCK = asyncio.Lock()
PLAYGROUND_HTML = (resources.files(__package__) / "playground.html").read_text()
_TAG = re.compile(re.escape(REFUSAL_TAG).replace(re.escape("{}"), "(.+?)"))


def describe_steers(config: SteerConfig, bounds: dict[str, float]) -> list[dict]:
    """What GET /v1/steers lists: each served steer's name, dims, eps, rank, base model, bound and size; no
    paths (the operator's log has them)."""
    return [{"name": name, "dim_names": list(h.dim_names), "primary_dim": h.primary_dim, "bias_dims": h.bias_dims,
             "epsilon": h.epsilon, "rank": h.rank, "hidden_size": h.hidden_size, "base_model": h.base_model,
             "max_abs_value": bounds[name], "fingerprint": h.fingerprint is not None,
             "parameters": 2 * h.num_dims * h.hidden_size * h.rank}
            for name, h in config.catalog.items()]


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
    """The JSON form of a runtime load: a path under the server's steer load folders."""

    name: str
    path: str
    max_abs_value: float | None = None


class UnloadSteerRequest(BaseModel):
    name: str


class PresetRequest(BaseModel):
    """A preset to add at run time: its name (a model name) and its steers' values, as in vllm_xargs."""

    name: str
    steers: dict[str, float | list[float]]


class SteerEndpoints:
    """The `vllm.endpoint_plugins` entry point (loaded only when VLLM_PLUGINS names
    vllm_steer): GET /v1/steers always; POST /v1/load_steer and /v1/unload_steer only with
    VLLM_STEER_ALLOW_RUNTIME_UPDATES=1, as vLLM gates runtime LoRA updates, and only with one API
    server and internal load balancing (refused at start-up otherwise)."""

    name = "vllm_steer"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        def error(status: int, message: str) -> JSONResponse:
            kind = {400: "BadRequestError", 404: "NotFoundError", 413: "PayloadTooLargeError"}.get(
                status, "InternalServerError")
            return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

        router = APIRouter()

        @router.get("/v1/steers")
        async def list_steers() -> dict:
            steers = admitted()
            return {"object": "list", "data": describe_steers(steers.config, steers.bounds)}

        @router.get("/v1/steer_presets")
        async def list_presets() -> dict:
            return {"object": "list", "data": [{"name": name, "steers": values}
                                               for name, values in admitted().config.presets.items()]}

        @router.get("/v1/steer_keywords")
        async def steer_keywords(raw: Request, steer: str, top: int = 12):
            if steer not in admitted().config.steers:
                return error(404, f"no steer named {steer!r} is loaded")
            top = max(1, min(top, 100))
            try:
                return await keywords(raw.app.state.vllm_steer_engine, raw.app.state.vllm_steer_tokenizer, steer, top)
            except Exception as e:  # unloaded meanwhile, or an LM head the workers cannot read
                logger.warning("vllm-steer: keywords of %r: %s", steer, e)
                return error(400, f"no keywords for steer {steer!r}: {type(e).__name__}")

        if playground_served():

            @router.get("/playground")
            async def playground(raw: Request, key: str | None = None):
                # A browser cannot send the API key's header when it opens a page: the key comes in the address
                # (?key=...), and the page sends it on with every API call, which vLLM checks as ever.
                tokens = api_keys(app.state.args)
                if tokens and not any(hmac.compare_digest((key or "").encode(), t.encode()) for t in tokens):
                    return HTMLResponse("<!doctype html><title>vllm-steer playground</title><p>This server needs its "
                                        "API key: open /playground?key=YOUR_API_KEY.</p>", status_code=401)
                return HTMLResponse(PLAYGROUND_HTML)

        if steers_configured():  # presets need the steers; without any, vLLM runs as if this were not here
            app.add_middleware(PresetRequests, base_model=lambda: app.state.vllm_steer_served_models[0])

            @router.get("/v1/models")  # vLLM's listing, with the presets (replaces vLLM's route)
            async def list_models(raw: Request) -> JSONResponse:
                models = (await raw.app.state.openai_serving_models.show_available_models()).model_dump()
                models["data"].extend(model_cards(raw.app.state.vllm_steer_served_models[0]))
                return JSONResponse(models)

        if runtime_updates_allowed():

            @router.post("/v1/load_steer")
            async def load_steer(raw: Request):
                # The file is read and checked before the lock, so that a slow upload or read never holds up
                # other loads, unloads or listings.
                try:
                    source = await _load_source(raw, admitted().config)
                except ValueError as e:  # LoadRefused, or the name or bound SteerConfig refuses
                    return error(getattr(e, "status", 400), f"cannot load the steer: {e}")
                try:
                    steer = parse_steer(source)
                    check_fits_model(steer.header, raw.app.state.vllm_steer_hidden_size, source.origin)
                except ValueError as e:
                    return error(400, f"cannot load steer {source.name!r}: {_client_text(e)}")
                async with _REGISTRY_LOCK:
                    current = admitted().config
                    try:
                        new = current.with_steer(source.name, source.path or UPLOADED, steer.header,
                                                 source.max_abs_value)
                    except ValueError as e:  # loaded meanwhile under this name
                        return error(400, f"cannot load steer {source.name!r}: {e}")
                    logger.info("vllm-steer: loading steer %r from %s", source.name, source.origin)
                    try:
                        await change_steer_set(raw.app.state.vllm_steer_engine, new, source.name, source.data)
                    except PartialCommitError as e:
                        logger.error("vllm-steer: loading %r: every worker prepared it, but committing failed: %s",
                                     source.name, e)
                        return error(500, f"loading steer {source.name!r}: every worker accepted it, but switching to "
                                          "it failed in at least one; the workers may now serve different steer "
                                          f"sets while this front end still admits only {sorted(current.steers)}. "
                                          f"Unload {source.name!r} and load it again, or restart the server.")
                    except Exception as e:  # a worker refused it (fingerprint, budget): nothing changed
                        logger.warning("vllm-steer: loading %r: refused by a worker: %s", source.name, e)
                        return error(400, f"cannot load steer {source.name!r}: not a valid steer file for this server: "
                                          f"{worker_refusal(e)} (nothing changed: every engine and worker still "
                                          "serves the steers it served before)")
                    admit(new)
                    return {"loaded": source.name, "steers": list(new.steers)}

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

            @router.post("/v1/load_preset")
            async def load_preset(body: PresetRequest, raw: Request):
                async with _REGISTRY_LOCK:  # presets live in the front end: no worker needs them
                    current = admitted()
                    if body.name in current.config.presets:
                        return error(400, f"a preset named {body.name!r} exists; unload it first")
                    state = raw.app.state
                    clash = preset_clash(body.name, state.vllm_steer_served_models, state.vllm_steer_lora_modules)
                    try:
                        if clash:
                            raise ValueError(clash)
                        new = current.config.with_preset(body.name, body.steers)
                        current.preset_xargs(body.name, body.steers)
                    except SteerRequestError as e:  # it names the preset
                        return error(400, f"cannot add {e}")
                    except ValueError as e:
                        return error(400, f"cannot add preset {body.name!r}: {e}")
                    admit(new)
                    return {"loaded_preset": body.name, "presets": list(new.presets)}

            @router.post("/v1/unload_preset")
            async def unload_preset(body: UnloadSteerRequest):
                async with _REGISTRY_LOCK:
                    current = admitted().config
                    if body.name not in current.presets:
                        return error(404, f"no preset named {body.name!r}")
                    new = current.without_preset(body.name)
                    admit(new)
                    return {"unloaded_preset": body.name, "presets": list(new.presets)}

        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        check_internals("registry")
        if runtime_updates_allowed() and (refusal := runtime_updates_refusal(args)):
            raise ValueError(f"vllm-steer: {refusal}")
        state.vllm_steer_engine = engine_client
        state.vllm_steer_hidden_size = engine_client.vllm_config.model_config.get_hidden_size()
        state.vllm_steer_tokenizer = engine_client.get_tokenizer()
        state.vllm_steer_served_models, state.vllm_steer_lora_modules = served_names(args)
        if steers_configured():
            check_presets(admitted(), *served_names(args))  # a bad preset stops start-up, naming it


async def _load_source(request: Request, config: SteerConfig) -> LoadSource:
    """A runtime load's steer file: uploaded (multipart/form-data), or a path under the load folders (JSON). The
    name (letters, digits, underscores; not loaded yet) and the bound are checked before the path is read."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        source = await read_upload(request, config.max_load_bytes)
        config.with_steer(source.name, UPLOADED, None, source.max_abs_value)
        return source
    try:
        body = LoadSteerRequest.model_validate(await request.json())
    except Exception as e:  # not JSON, or not the fields
        raise LoadRefused("expected JSON {\"name\": ..., \"path\": ...} (a path under the server's steer load "
                          "folders) or a multipart/form-data upload with the fields name and file"
                          f" ({type(e).__name__})") from None
    config.with_steer(body.name, UPLOADED, None, body.max_abs_value)
    data = await read_path(body.path, resolved_roots(config.load_dirs), config.max_load_bytes)
    return LoadSource(body.name, data, os.path.realpath(body.path), body.max_abs_value)


# Candidate tokens each worker sends per side; the front end keeps the readable words among them.
KEYWORD_CANDIDATES = 300


async def keywords(engine, tokenizer, name: str, top: int) -> dict:
    """The words steer `name`'s primary direction promotes and suppresses on the served model: each worker's
    candidates from its vocabulary shard (`WorkerSteering.keywords`), merged, the direction's sign fixed by the
    mean output-embedding row (so that promoted words are the ones +1 raises), decoded with the server's
    tokenizer, readable words only."""
    parts = [r for r in await engine.collective_rpc(RPC_PREFIX + "keywords", args=(name, KEYWORD_CANDIDATES))
             if isinstance(r, dict) and "top" in r]
    if not parts:
        raise RuntimeError("no worker holds the LM head")
    sign = 1.0 if sum(p["context"] for p in parts) >= 0 else -1.0
    raised, lowered = ("top", "bottom") if sign > 0 else ("bottom", "top")

    def words(side: str) -> list[dict]:
        candidates = sorted({tid: score for p in parts for tid, score in p[side]}.items(), key=lambda c: -abs(c[1]))
        pieces = [(tid, score, tokenizer.decode([tid])) for tid, score in candidates]
        spaced = sum(piece.startswith(" ") for _, _, piece in pieces) > 0.1 * max(len(pieces), 1)
        out, seen = [], set()
        for tid, score, piece in pieces:
            word = piece.strip()
            if is_readable_word(piece, spaced) and word.lower() not in seen:
                seen.add(word.lower())
                out.append({"word": word, "token_id": tid, "score": round(sign * score, 4)})
            if len(out) == top:
                break
        return out

    header = admitted().catalog[name]
    return {"steer": name, "dim": header.primary_dim, "promoted": words(raised), "suppressed": words(lowered)}


def api_keys(args) -> list[str]:
    """The API keys vLLM's server requires, as vLLM reads them (--api-key, else VLLM_API_KEY)."""
    return [k for k in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]) if k]


def worker_refusal(error: BaseException) -> str:
    """What a worker's refusal of a runtime load says, for the client: the check it tagged, else only that a
    worker refused (the operator's log has the whole message)."""
    found = _TAG.search(str(error))
    return found.group(1) if found else f"a worker refused it ({type(error).__name__}; see the server log)"


def _client_text(error: Exception) -> str:
    """A refusal as the client is told it: the check a steer file failed, never what the file holds."""
    return f"not a valid steer file: {error.check}" if isinstance(error, SteerFileError) else str(error)
