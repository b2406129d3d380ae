"""Steer presets served as models, in the API front end: a client that can only choose a model steers by choosing
a preset's name. A middleware rewrites such a completion or chat request (the model becomes the base model, the
preset's values go into vllm_xargs, where the request's own `steer_` keys win) and its answer (the model back to
the preset's name, streamed or not); the models listing shows each preset with the base model as its parent."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

from vllm_steer.steer.values import SteerRequestError

from .front_end import AdmittedSteers, admitted
from .metrics import METRICS

STEERED_PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_BODY = 64 * 2**20  # a request body this middleware reads to find its model (vLLM reads it anyway)

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def preset_clash(name: str, served_models: list[str], lora_modules: list[str]) -> str | None:
    """Why a preset may not be named `name`, or None: a model name it would hide."""
    if name in served_models:
        return f"preset {name!r} has the name of the served model; name it otherwise"
    if name in lora_modules:
        return f"preset {name!r} has the name of a LoRA module; name it otherwise"
    return None


def served_names(args) -> tuple[list[str], list[str]]:
    """(the names vLLM serves the model under, the LoRA modules' names) from vLLM's arguments."""
    served = getattr(args, "served_model_name", None) or [args.model]
    served = [served] if isinstance(served, str) else list(served)
    return served, [getattr(m, "name", str(m).partition("=")[0]) for m in getattr(args, "lora_modules", None) or []]


def check_presets(steers: AdmittedSteers, served_models: list[str], lora_modules: list[str]) -> None:
    """Every configured preset is servable: a name that hides no model, values any request could ask for;
    ValueError naming the preset otherwise."""
    for name in steers.config.presets:
        if clash := preset_clash(name, served_models, lora_modules):
            raise ValueError(f"vllm-steer: {clash}")
        try:
            steers.preset_xargs(name)
        except ValueError as e:
            raise ValueError(f"vllm-steer: {e}") from e


def model_cards(base_model: str) -> list[dict]:
    """The presets as /v1/models lists them: each a model whose parent is the base model."""
    created = int(time.time())
    return [{"id": name, "object": "model", "created": created, "owned_by": "vllm-steer", "root": base_model,
             "parent": base_model, "permission": []} for name in admitted().config.presets]


def steered_body(body: dict, preset: str, base_model: str) -> dict:
    """A request for `preset` as the base model's: the preset's steer values in its vllm_xargs, under the
    request's own `steer_` keys (which win) and beside its other keys."""
    xargs = admitted().preset_xargs(preset)
    own = body.get("vllm_xargs") or {}
    if not isinstance(own, dict):
        raise SteerRequestError("vllm_xargs must be an object", "not_a_number")
    METRICS.preset_requests.labels(preset=preset).inc()
    return {**body, "model": base_model, "vllm_xargs": {**xargs, **own}}


class PresetRequests:
    """The ASGI middleware that serves presets as models (see the module docstring). `base_model`: the name
    vLLM serves the model under."""

    def __init__(self, app: Callable, base_model: Callable[[], str]) -> None:
        self.app, self.base_model = app, base_model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in STEERED_PATHS \
                or not admitted().config.presets:
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY:
                return await _error(send, 413, "the request body is too large")
        preset = _preset_of(body)
        if preset is None:
            return await self.app(scope, _replay(body, receive), send)
        try:
            rewritten = json.dumps(steered_body(json.loads(body), preset, self.base_model())).encode()
        except SteerRequestError as e:
            METRICS.rejected.labels(reason=e.reason).inc()
            return await _error(send, 400, str(e))
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(rewritten)).encode())]}
        await self.app(scope, _replay(rewritten, receive), _renaming(send, self.base_model(), preset))


def _preset_of(body: bytes) -> str | None:
    """The preset a request body's model names, or None (not JSON, no model, another model)."""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) and model in admitted().config.presets else None


def _replay(body: bytes, receive: Receive) -> Receive:
    """The request's body, already read, as one message; then the client's own messages (a disconnect)."""
    sent = False

    async def replaying() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replaying


def _renaming(send: Send, base_model: str, preset: str) -> Send:
    """`send` with the answer's model named as the client asked for it: a JSON body whole, an event stream line
    by line (each `data: {...}` line a chunk of JSON)."""
    state = {"stream": False, "pending": b"", "start": None}

    async def renaming_send(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = dict((k.lower(), v) for k, v in message.get("headers", []))
            state["stream"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            if state["stream"]:
                return await send(message)
            state["start"] = message  # sent with the rewritten body and its length
            return None
        if message["type"] != "http.response.body":
            return await send(message)
        data = state["pending"] + message.get("body", b"")
        if state["stream"]:
            *lines, state["pending"] = data.split(b"\n")
            out = b"".join(_renamed_line(line, base_model, preset) + b"\n" for line in lines)
            if not message.get("more_body", False):
                out, state["pending"] = out + _renamed_line(state["pending"], base_model, preset), b""
            return await send({**message, "body": out})
        if message.get("more_body", False):
            state["pending"] = data
            return None
        body = _renamed_json(data, base_model, preset)
        start = state["start"]
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({**message, "body": body})

    return renaming_send


def _renamed_json(data: bytes, base_model: str, preset: str) -> bytes:
    try:
        obj = json.loads(data)
    except ValueError:
        return data
    if isinstance(obj, dict) and obj.get("model") == base_model:
        obj["model"] = preset
        return json.dumps(obj).encode()
    return data


def _renamed_line(line: bytes, base_model: str, preset: str) -> bytes:
    if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
        return line
    return b"data: " + _renamed_json(line[6:], base_model, preset)


async def _error(send: Send, status: int, message: str) -> None:
    kind = {400: "BadRequestError", 413: "PayloadTooLargeError"}.get(status, "BadRequestError")
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

