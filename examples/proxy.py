#!/usr/bin/env python
"""Disaggregated prefill/decode proxy (the protocol of vLLM's toy_proxy_server.py; works with
SplitZipConnector and with vLLM's NixlConnector).

Per request: send the prompt to a prefill server with ``max_tokens=1`` and
``kv_transfer_params={"do_remote_decode": true}``, then send the original request to a decode server with the
``kv_transfer_params`` the prefill server answered, streaming the decode response back.

    python examples/proxy.py --port 8000 --prefiller-hosts 127.0.0.1 --prefiller-ports 8100 \
        --decoder-hosts 127.0.0.1 --decoder-ports 8200
"""
from __future__ import annotations

import argparse
import itertools
import os
import uuid
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def build_app(prefillers: list[str], decoders: list[str], timeout: float = 600.0) -> FastAPI:
    p_cycle, d_cycle = itertools.cycle(prefillers), itertools.cycle(decoders)
    clients: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        for url in set(prefillers + decoders):
            clients[url] = httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits)
        yield
        for c in clients.values():
            await c.aclose()

    app = FastAPI(lifespan=lifespan)

    def headers(request_id: str) -> dict[str, str]:
        h = {"X-Request-Id": request_id}
        if key := os.environ.get("OPENAI_API_KEY"):
            h["Authorization"] = f"Bearer {key}"
        return h

    async def handle(request: Request, path: str):
        body = await request.json()
        request_id = request.headers.get("X-Request-Id") or str(uuid.uuid4())
        p_body = dict(body, stream=False, max_tokens=1,
                      kv_transfer_params={"do_remote_decode": True, "do_remote_prefill": False,
                                          "remote_engine_id": None, "remote_block_ids": None,
                                          "remote_host": None, "remote_port": None})
        if "max_completion_tokens" in p_body:
            p_body["max_completion_tokens"] = 1
        for k in ("stream_options", "min_tokens", "min_completion_tokens"):
            p_body.pop(k, None)
        p_resp = await clients[next(p_cycle)].post(path, json=p_body, headers=headers(request_id))
        if p_resp.status_code != 200:
            return JSONResponse(status_code=p_resp.status_code, content=_json_or_text(p_resp))
        d_body = dict(body, kv_transfer_params=p_resp.json().get("kv_transfer_params"))
        d_client = clients[next(d_cycle)]
        if body.get("stream"):
            req = d_client.build_request("POST", path, json=d_body, headers=headers(request_id))
            d_resp = await d_client.send(req, stream=True)

            async def relay():
                try:
                    async for chunk in d_resp.aiter_bytes():
                        yield chunk
                finally:
                    await d_resp.aclose()
            return StreamingResponse(relay(), status_code=d_resp.status_code,
                                     media_type=d_resp.headers.get("content-type", "text/event-stream"))
        d_resp = await d_client.post(path, json=d_body, headers=headers(request_id))
        return JSONResponse(status_code=d_resp.status_code, content=_json_or_text(d_resp))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, "/v1/chat/completions")

    @app.get("/healthcheck")
    async def healthcheck():
        return {"status": "ok", "prefill": prefillers, "decode": decoders}

    return app


def _json_or_text(resp: httpx.Response):
    try:
        return resp.json()
    except ValueError:
        return {"error": resp.text}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--prefiller-hosts", nargs="+", default=["127.0.0.1"])
    ap.add_argument("--prefiller-ports", nargs="+", type=int, default=[8100])
    ap.add_argument("--decoder-hosts", nargs="+", default=["127.0.0.1"])
    ap.add_argument("--decoder-ports", nargs="+", type=int, default=[8200])
    a = ap.parse_args()

    def urls(hosts: list[str], ports: list[int]) -> list[str]:
        if len(hosts) == 1:
            hosts = hosts * len(ports)
        if len(hosts) != len(ports):
            ap.error("give one host, or as many hosts as ports")
        return [f"http://{h}:{p}" for h, p in zip(hosts, ports)]

    app = build_app(urls(a.prefiller_hosts, a.prefiller_ports), urls(a.decoder_hosts, a.decoder_ports))
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
