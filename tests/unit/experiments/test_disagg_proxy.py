"""The disaggregated-prefill proxy over real HTTP (aiohttp servers standing in for the two vLLM
instances, which the integration test runs for real): request flow, streaming, faults."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import ClientSession, web

from lmcache.experiments.disagg_proxy import DisaggProxy


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


def _upstream(name: str, seen: list) -> web.Application:
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append((name, body))
        if body.get("stream"):
            r = web.StreamResponse()
            await r.prepare(request)
            for tok in ("a", "b"):
                await r.write(f"data: {json.dumps({'choices': [{'text': tok}]})}\n\n".encode())
            await r.write(b"data: [DONE]\n\n")
            await r.write_eof()
            return r
        return web.json_response({"choices": [{"text": f"{name}:{body['max_tokens']}"}]})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    return app


def test_prefill_then_decode_streaming_and_a_dead_prefiller():
    async def run():
        seen: list = []
        pre, pre_url = await _serve(_upstream("prefiller", seen))
        dec, dec_url = await _serve(_upstream("decoder", seen))
        proxy, url = await _serve(DisaggProxy(pre_url, dec_url, timeout_s=5).app())
        try:
            async with ClientSession() as s:
                body = {"model": "m", "prompt": "hello", "max_tokens": 7, "stream": False}
                async with s.post(url + "/v1/completions", json=body) as r:
                    assert r.status == 200
                    assert (await r.json())["choices"][0]["text"] == "decoder:7"
                    timing = json.loads(r.headers["x-lmcache-pd-timing"])
                    assert timing["prefill_s"] > 0 and timing["decode_s"] > 0
                assert seen == [("prefiller", dict(body, max_tokens=1)), ("decoder", body)]
                seen.clear()
                async with s.post(url + "/v1/completions", json=dict(body, stream=True,
                                  stream_options={"include_usage": True})) as r:
                    text = (await r.read()).decode()
                assert text.count("data: ") == 3 and text.endswith("data: [DONE]\n\n")
                assert seen[0][1]["stream"] is False and "stream_options" not in seen[0][1]
                async with s.get(url + "/pd/stats") as r:
                    assert (await r.json())["requests"] == 2
                async with s.get(url + "/health") as r:
                    assert r.status == 200
                await pre.cleanup()  # the prefiller dies
                t0 = time.monotonic()
                async with s.post(url + "/v1/completions", json=body) as r:
                    assert r.status == 502
                    err = (await r.json())["error"]
                assert err["type"] == "prefiller_error" and pre_url in err["message"]
                assert time.monotonic() - t0 < 5
                async with s.get(url + "/health") as r:
                    assert r.status == 503 and "prefiller" in (await r.json())["error"]["message"]
                async with s.post(url + "/v1/completions", data=b"{not json") as r:
                    assert r.status == 400
        finally:
            await proxy.cleanup()
            await dec.cleanup()
            await pre.cleanup()

    asyncio.run(run())
