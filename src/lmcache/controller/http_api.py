"""The controller's HTTP API (FastAPI): LMCache's controller operations, same paths and fields.

=========================  ==================================================================
``POST /lookup``           ``{tokens}`` → ``{event_id, layout_info: {instance: [location, n]}}``
``POST /clear``            ``{instance_id, location}`` → ``{event_id, num_tokens}``
``POST /pin``              ``{instance_id, location, tokens}`` → ``{event_id, num_tokens}``
``POST /move``             ``{old_position: [inst, loc], new_position: [inst, loc], tokens,
                           should_copy}`` → ``{event_id, num_tokens}``
``POST /health``           ``{instance_id}`` → ``{event_id, error_codes: {worker_id: code}}``
``POST /query_worker_info`` ``{instance_id, worker_ids}`` → ``{event_id, worker_infos}``
``POST /query_instance``   ``{ip}`` → ``{event_id, res}``
``GET /health``            the controller itself: ``{status, workers, index_entries}``
=========================  ==================================================================

An unknown instance is 404, a worker that fails or does not answer 503 (both with ``detail``
naming it), a malformed body 422 (FastAPI's validation; also tokens the workers cannot hash,
e.g. an id beyond int64).

``POST /lookup`` also takes the prompt in a compact body, by ``Content-Type``:
``application/json`` (LMCache's, the default), ``application/msgpack`` (the same map
``{"tokens": [...]}``) or ``application/octet-stream`` (the token ids as little-endian int32,
4 bytes each: no per-token parsing at all). Another content type is 415.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Optional

import msgpack
import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from lmcache.controller.cache_controller import CacheController, TokenError


Int64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]
"""A token id of /pin and /move, checked here (422 naming it) before it goes to the workers;
/lookup's ids are checked by the hashing itself (no per-token cost: :class:`TokenError`)."""


class LookupRequest(BaseModel):
    tokens: list[int]


class ClearRequest(BaseModel):
    instance_id: str
    location: str = "LocalCPUBackend"


class PinRequest(BaseModel):
    instance_id: str
    location: str = "LocalCPUBackend"
    tokens: list[Int64]


class MoveRequest(BaseModel):
    old_position: tuple[str, str]
    new_position: tuple[str, str]
    tokens: list[Int64] = []
    should_copy: bool = False


class HealthRequest(BaseModel):
    instance_id: str


class QueryWorkerInfoRequest(BaseModel):
    instance_id: str
    worker_ids: Optional[list[int]] = None


class QueryInstRequest(BaseModel):
    ip: str


def _call(name: str, fn, *args):
    try:
        return fn(*args)
    except TokenError as e:  # the body's tokens (e.g. an id beyond int64): the client's error
        raise HTTPException(status_code=422, detail=f"{name}: {e}") from None
    except KeyError as e:
        raise HTTPException(status_code=404, detail=str(e.args[0])) from None
    except RuntimeError as e:
        raise HTTPException(status_code=503, detail=str(e)) from None
    except Exception as e:  # noqa: BLE001 - the index (e.g. Valkey) failed
        raise HTTPException(status_code=503, detail=f"{name}: {type(e).__name__}: {e}") from None


TOKEN_BODY_TYPES = ("application/json", "application/msgpack", "application/octet-stream")
"""Content types ``POST /lookup`` accepts (see the module docstring)."""


def parse_tokens(content_type: Optional[str], body: bytes):
    """The tokens of a ``/lookup`` body: a list of ints (JSON, msgpack) or an int32 array
    (octet-stream).

    Raises:
        HTTPException: 415 for another content type.
        RequestValidationError: (422) a body that does not hold a list of ints, or an
            octet-stream body whose length is not a multiple of 4.
    """
    kind = (content_type or "application/json").split(";")[0].strip().lower()
    try:
        if kind == "application/json":
            return LookupRequest.model_validate_json(body).tokens
        if kind == "application/msgpack":
            try:
                obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
            except (ValueError, msgpack.ExtraData) as e:
                raise RequestValidationError([{"type": "msgpack", "loc": ("body",),
                                               "msg": f"not a msgpack body: {e}"}]) from None
            return LookupRequest.model_validate(obj).tokens
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_input=False)) from None
    if kind == "application/octet-stream":
        if len(body) % 4:
            raise RequestValidationError([{
                "type": "int32_array", "loc": ("body",),
                "msg": f"an int32 token array has a multiple of 4 bytes, got {len(body)}"}])
        return np.frombuffer(body, dtype="<i4")
    raise HTTPException(status_code=415, detail=f"/lookup takes a body of type "
                                                f"{', '.join(TOKEN_BODY_TYPES)}; got {kind!r}")


_LOOKUP_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": LookupRequest.model_json_schema()},
    "application/msgpack": {"schema": LookupRequest.model_json_schema()},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": "token ids, little-endian int32"}}}}}


def _event(name: str) -> str:
    return f"{name}{uuid.uuid4()}"


def create_app(controller: CacheController) -> FastAPI:
    """The FastAPI application serving ``controller``."""
    app = FastAPI(title="lmcache cache controller")

    @app.post("/lookup", openapi_extra=_LOOKUP_BODY)
    async def lookup(request: Request):
        tokens = parse_tokens(request.headers.get("content-type"), await request.body())
        info = await run_in_threadpool(_call, "lookup", controller.lookup, tokens)
        return {"event_id": _event("Lookup"),
                "layout_info": {k: [loc, n] for k, (loc, n) in info.items()}}

    @app.post("/clear")
    def clear(req: ClearRequest):
        n = _call("clear", controller.clear, req.instance_id, req.location)
        return {"event_id": _event("Clear"), "num_tokens": n}

    @app.post("/pin")
    def pin(req: PinRequest):
        n = _call("pin", controller.pin, req.instance_id, req.location, req.tokens)
        return {"event_id": _event("Pin"), "num_tokens": n}

    @app.post("/move")
    def move(req: MoveRequest):
        n = _call("move", controller.move, req.old_position, req.new_position, req.tokens,
                  req.should_copy)
        return {"event_id": _event("Move"), "num_tokens": n}

    @app.post("/health")
    def health(req: HealthRequest):
        codes = _call("health", controller.health, req.instance_id)
        return {"event_id": _event("health"), "error_codes": codes}

    @app.get("/health")
    def controller_health():
        workers = _call("health", controller.index.workers)
        return {"status": "ok", "workers": len(workers),
                "index_entries": _call("health", controller.index.num_entries)}

    @app.post("/query_worker_info")
    def query_worker_info(req: QueryWorkerInfoRequest):
        infos = _call("query_worker_info", controller.query_worker_info, req.instance_id,
                      req.worker_ids)
        return {"event_id": _event("QueryWorkerInfo"), "worker_infos": [w.to_dict() for w in infos]}

    @app.post("/query_instance")
    def query_instance(req: QueryInstRequest):
        return {"event_id": _event("QueryInst"),
                "res": _call("query_instance", controller.query_instance, req.ip)}

    return app
