"""The disaggregated-prefill proxy: one OpenAI-compatible endpoint in front of a prefiller and a
decoder (``python -m lmcache.experiments.disagg_proxy --prefiller URL --decoder URL``).

Each ``/v1/completions`` or ``/v1/chat/completions`` request goes first to the prefiller with
``max_tokens`` 1 (``max_completion_tokens`` too for chat, ``stream`` off): its answer means the
prefill ran and its KV was pushed into the decoder's buffer (lmcache's PD tier pushes before the
step ends). Then the original request goes to the decoder, whose answer (streamed or not) is
passed back as it comes. Per request the proxy measures ``prefill_s`` (the prefiller's round
trip, which includes the KV push) and ``decode_s`` (the decoder's, until its last byte); they are
sent in the ``x-lmcache-pd-timing`` header of a non-streamed answer and listed by ``GET /pd/stats``.
A prefiller that fails or is down is a 502 naming it (``type: prefiller_error``), never a hang:
every upstream call has ``--timeout`` seconds. Server library: aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web

logger = logging.getLogger("lmcache.disagg_proxy")

HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding"}


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}},
                             status=status)


class DisaggProxy:
    """The aiohttp application state: upstream URLs, one client session, timings."""

    def __init__(self, prefiller: str, decoder: str, timeout_s: float = 600.0,
                 keep: int = 10000) -> None:
        self.prefiller, self.decoder = prefiller.rstrip("/"), decoder.rstrip("/")
        self.timeout = ClientTimeout(total=timeout_s)
        self.keep = keep
        self.timings: list[dict[str, Any]] = []
        self.session: ClientSession | None = None

    async def start(self, app: web.Application) -> None:
        self.session = ClientSession(timeout=self.timeout)

    async def stop(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/pd/stats", self.stats)
        return app

    async def _prefill(self, path: str, body: dict) -> None:
        """The prefill round trip; raises web.HTTPException (502) naming the prefiller."""
        req = dict(body, max_tokens=1, stream=False)
        req.pop("stream_options", None)
        if "max_completion_tokens" in body or path.endswith("chat/completions"):
            req["max_completion_tokens"] = 1
        try:
            async with self.session.post(self.prefiller + path, json=req) as r:
                text = await r.text()
                if r.status != 200:
                    raise web.HTTPBadGateway(
                        text=json.dumps({"error": {"type": "prefiller_error", "code": 502,
                                                   "message": f"prefiller {self.prefiller} answered "
                                                              f"{r.status}: {text[:1000]}"}}),
                        content_type="application/json")
        except (ClientError, asyncio.TimeoutError, OSError) as e:
            raise web.HTTPBadGateway(
                text=json.dumps({"error": {"type": "prefiller_error", "code": 502,
                                           "message": f"prefiller {self.prefiller} failed: "
                                                      f"{type(e).__name__}: {e}"}}),
                content_type="application/json") from None

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid_request_error", "the request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "invalid_request_error", "the request body is not a JSON object")
        path = request.path
        t0 = time.perf_counter()
        await self._prefill(path, body)
        t1 = time.perf_counter()
        timing = {"prefill_s": t1 - t0}
        try:
            async with self.session.post(self.decoder + path, json=body) as r:
                headers = {k: v for k, v in r.headers.items() if k.lower() not in HOP_HEADERS}
                if not body.get("stream"):
                    data = await r.read()
                    timing["decode_s"] = time.perf_counter() - t1
                    self._record(timing)
                    headers["x-lmcache-pd-timing"] = json.dumps(timing)
                    return web.Response(body=data, status=r.status, headers=headers)
                out = web.StreamResponse(status=r.status, headers=headers)
                await out.prepare(request)
                try:
                    async for piece in r.content.iter_any():
                        timing.setdefault("decode_first_byte_s", time.perf_counter() - t1)
                        await out.write(piece)
                except (ConnectionResetError, ClientError):  # the client left after [DONE]
                    pass
                timing["decode_s"] = time.perf_counter() - t1
                self._record(timing)
                try:
                    await out.write_eof()
                except ConnectionResetError:
                    pass
                return out
        except (ClientError, asyncio.TimeoutError, OSError) as e:
            return _error(502, "decoder_error", f"decoder {self.decoder} failed: "
                                                 f"{type(e).__name__}: {e}")

    def _record(self, timing: dict) -> None:
        self.timings.append(timing)
        del self.timings[:-self.keep]

    async def models(self, request: web.Request) -> web.Response:
        try:
            async with self.session.get(self.decoder + "/v1/models") as r:
                return web.Response(body=await r.read(), status=r.status,
                                    content_type="application/json")
        except (ClientError, asyncio.TimeoutError, OSError) as e:
            return _error(502, "decoder_error", f"decoder {self.decoder} failed: {e}")

    async def health(self, request: web.Request) -> web.Response:
        bad = []
        for name, url in (("prefiller", self.prefiller), ("decoder", self.decoder)):
            try:
                async with self.session.get(url + "/health", timeout=ClientTimeout(total=5)) as r:
                    if r.status != 200:
                        bad.append(f"{name} {url}: {r.status}")
            except (ClientError, asyncio.TimeoutError, OSError) as e:
                bad.append(f"{name} {url}: {type(e).__name__}")
        if bad:
            return _error(503, "unhealthy", "; ".join(bad))
        return web.json_response({"status": "ok"})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"requests": len(self.timings), "timings": self.timings})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefiller", required=True, help="base URL of the prefiller, e.g. http://127.0.0.1:8100")
    p.add_argument("--decoder", required=True, help="base URL of the decoder, e.g. http://127.0.0.1:8200")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per upstream call")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    proxy = DisaggProxy(a.prefiller, a.decoder, a.timeout)
    web.run_app(proxy.app(), host=a.host, port=a.port, print=lambda *_: None)


if __name__ == "__main__":
    main()
