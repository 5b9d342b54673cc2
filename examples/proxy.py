#!/usr/bin/env python
"""Disaggregated prefill/decode proxy (the protocol of vLLM's toy_proxy_server.py; works with
SplitZipConnector and with vLLM's NixlConnector).

Whole-request mode (default; any connector): send the prompt to a prefill server with ``max_tokens=1`` and
``kv_transfer_params={"do_remote_decode": true}``, then send the original request to a decode server with the
``kv_transfer_params`` the prefill server answered, streaming the decode response back.

    python examples/proxy.py --port 8000 --prefiller-hosts 127.0.0.1 --prefiller-ports 8100 \
        --decoder-hosts 127.0.0.1 --decoder-ports 8200

Layer-wise mode (SplitZipConnector only, docs/LAYERWISE.md): ``--transfer layerwise
--prefiller-side-channels HOST:PORT ...`` (each prefill's VLLM_NIXL_SIDE_CHANNEL_HOST/PORT). The proxy names the
transfer itself and sends the request to prefill and decode at once, so decode reads each layer's KV while
prefill still computes the next ones. If prefill answers an error, the decode request is cancelled and the error
returned; if prefill dies (connection lost), decode's load fails and its ``kv_load_failure_policy`` applies, as in
whole-request mode.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import uuid
from contextlib import asynccontextmanager

import httpx
import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def build_app(prefillers: list[str], decoders: list[str], timeout: float = 600.0,
              side_channels: list[tuple[str, int]] | None = None) -> FastAPI:
    """``side_channels`` (one per prefiller): layer-wise mode."""
    p_cycle, d_cycle = itertools.cycle(prefillers), itertools.cycle(decoders)
    clients: dict[str, httpx.AsyncClient] = {}
    identities: dict[str, dict] = {}
    sides = dict(zip(prefillers, side_channels or []))

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

    def prefill_body(body: dict, params: dict) -> dict:
        p_body = dict(body, stream=False, max_tokens=1, kv_transfer_params=params)
        if "max_completion_tokens" in p_body:
            p_body["max_completion_tokens"] = 1
        for k in ("stream_options", "min_tokens", "min_completion_tokens"):
            p_body.pop(k, None)
        return p_body

    async def handle(request: Request, path: str):
        body = await request.json()
        request_id = request.headers.get("X-Request-Id") or str(uuid.uuid4())
        if sides:
            return await handle_layerwise(body, path, request_id)
        p_body = prefill_body(body, {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                     "remote_block_ids": None, "remote_host": None, "remote_port": None})
        p_resp = await clients[next(p_cycle)].post(path, json=p_body, headers=headers(request_id))
        if p_resp.status_code != 200:
            return JSONResponse(status_code=p_resp.status_code, content=_json_or_text(p_resp))
        d_body = dict(body, kv_transfer_params=p_resp.json().get("kv_transfer_params"))
        return await to_decode(d_body, path, request_id, None)

    async def to_decode(d_body: dict, path: str, request_id: str, prefill: asyncio.Task | None):
        """Send to a decode server and relay its answer; ``prefill`` (layer-wise): the prefill call running
        beside it, whose error cancels the decode request."""
        d_client = clients[next(d_cycle)]
        if d_body.get("stream"):
            req = d_client.build_request("POST", path, json=d_body, headers=headers(request_id))
            d_resp = await d_client.send(req, stream=True)

            async def relay():
                try:
                    async for chunk in d_resp.aiter_bytes():
                        yield chunk
                finally:
                    await d_resp.aclose()
            if prefill is not None:
                prefill.add_done_callback(lambda t: _close_on_error(t, d_resp))
            return StreamingResponse(relay(), status_code=d_resp.status_code,
                                     media_type=d_resp.headers.get("content-type", "text/event-stream"))
        d_task = asyncio.ensure_future(d_client.post(path, json=d_body, headers=headers(request_id)))
        if prefill is not None:
            await asyncio.wait({prefill, d_task}, return_when=asyncio.FIRST_COMPLETED)
            if _refused(prefill) and not d_task.done():
                d_task.cancel()   # closing the connection aborts the request on decode
                return JSONResponse(status_code=prefill.result().status_code,
                                    content=_json_or_text(prefill.result()))
        d_resp = await d_task
        return JSONResponse(status_code=d_resp.status_code, content=_json_or_text(d_resp))

    async def handle_layerwise(body: dict, path: str, request_id: str):
        p_url = next(p_cycle)
        try:
            ident = await prefill_identity(p_url)
        except RuntimeError as e:
            return JSONResponse(status_code=503, content={"error": str(e)})
        transfer = uuid.uuid4().hex
        p_body = prefill_body(body, {"do_remote_decode": True, "do_remote_prefill": False,
                                     "splitzip_transfer": transfer})
        prefill = asyncio.ensure_future(clients[p_url].post(path, json=p_body, headers=headers(request_id)))
        prefill.add_done_callback(_log_lost_prefill)
        protocol = ident.pop("protocol")
        d_params = dict(ident, do_remote_prefill=True, do_remote_decode=False, remote_request_id=transfer,
                        remote_block_ids=[], splitzip={"protocol": protocol, "transfer": transfer})
        return await to_decode(dict(body, kv_transfer_params=d_params), path, request_id, prefill)

    async def prefill_identity(url: str) -> dict:
        """Engine id, side channel and TP size of a prefill server, from its rank-0 handshake (cached)."""
        if url not in identities:
            from splitzip_vllm.connector.contracts import Handshake
            from splitzip_vllm.transport.side_channel import HandshakeError, fetch_handshake
            host, port = sides[url]
            try:
                raw = await asyncio.to_thread(fetch_handshake, host, port, 0, 10.0)
                info = msgspec.msgpack.decode(raw, type=Handshake)
            except (HandshakeError, msgspec.DecodeError, msgspec.ValidationError) as e:
                raise RuntimeError(f"layer-wise mode: no SplitZipConnector handshake from the prefill side "
                                   f"channel {host}:{port} of {url} ({e}); check --prefiller-side-channels") from None
            identities[url] = {"remote_engine_id": info.engine_id, "remote_host": host, "remote_port": port,
                               "tp_size": info.tp_size, "protocol": info.protocol}
        return dict(identities[url])

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


def _log_lost_prefill(prefill: asyncio.Task) -> None:
    if not prefill.cancelled() and prefill.exception() is not None:
        print(f"proxy: layer-wise prefill call failed ({prefill.exception()!r}); decode recomputes or fails per "
              "its kv_load_failure_policy", flush=True)


def _refused(prefill: asyncio.Task) -> bool:
    """Layer-wise: prefill answered an error (decode would not get the KV; it is cancelled). A prefill that died
    (no answer) is not a refusal: decode's load fails and its kv_load_failure_policy decides."""
    return prefill.done() and not prefill.cancelled() and prefill.exception() is None and \
        prefill.result().status_code != 200


def _close_on_error(prefill: asyncio.Task, d_resp: httpx.Response) -> None:
    """Layer-wise, streaming: a prefill error ends the decode stream (and so the decode request)."""
    if _refused(prefill):
        asyncio.ensure_future(d_resp.aclose())


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
    ap.add_argument("--transfer", choices=["whole", "layerwise"], default="whole",
                    help="layerwise: send to prefill and decode at once (SplitZipConnector only)")
    ap.add_argument("--prefiller-side-channels", nargs="+", default=[],
                    help="layerwise: HOST:PORT of each prefiller's side channel, in --prefiller-ports order")
    a = ap.parse_args()

    def urls(hosts: list[str], ports: list[int]) -> list[str]:
        if len(hosts) == 1:
            hosts = hosts * len(ports)
        if len(hosts) != len(ports):
            ap.error("give one host, or as many hosts as ports")
        return [f"http://{h}:{p}" for h, p in zip(hosts, ports)]

    prefillers = urls(a.prefiller_hosts, a.prefiller_ports)
    sides = None
    if a.transfer == "layerwise":
        if len(a.prefiller_side_channels) != len(prefillers):
            ap.error("--transfer layerwise needs one --prefiller-side-channels HOST:PORT per prefiller")
        sides = [(h, int(p)) for h, _, p in (x.rpartition(":") for x in a.prefiller_side_channels)]
    app = build_app(prefillers, urls(a.decoder_hosts, a.decoder_ports), side_channels=sides)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
