"""Handshakes with prefill workers, off the engine thread.

A decode worker learns about a prefill worker from a request's ``kv_transfer_params``. Fetching its handshake
(ZMQ side channel, up to ``handshake_timeout``) and loading its NIXL agent metadata happen in a background
thread; the engine step only asks :meth:`PeerBook.get`, which never blocks: a request whose peer is not ready
simply keeps waiting (bounded by ``transfer_timeout``), and every other request keeps running.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import msgspec

from ..transport.base import Transport, TransportError
from ..transport.side_channel import HandshakeError
from .contracts import Handshake

logger = logging.getLogger("splitzip_vllm.connector")

RETRY_AFTER_S = 10.0    # a failed peer is not retried before this many seconds


class PeerUnavailableError(RuntimeError):
    """The handshake with a prefill worker failed (the message says why and what to change)."""


class IncompatiblePeerError(RuntimeError):
    """The prefill and decode servers differ in a setting that must match."""


@dataclass
class Peer:
    agent: str
    info: Handshake


@dataclass
class _Failure:
    at: float
    message: str


PeerKey = tuple[str, int]   # (engine id, prefill TP rank)
Fetch = Callable[[str, int, int, float], bytes]


class PeerBook:
    """Connected prefill workers by (engine id, TP rank); handshakes run on a background thread."""

    def __init__(self, transport: Transport, check: Callable[[Handshake, str], None], timeout_s: float,
                 fetch: Fetch):
        self._transport = transport
        self._check = check
        self._timeout_s = timeout_s
        self._fetch = fetch
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="splitzip-handshake")
        self._ready: dict[PeerKey, Peer] = {}
        self._pending: dict[PeerKey, Future] = {}
        self._failed: dict[PeerKey, _Failure] = {}

    def get(self, engine_id: str, host: str, port: int, rank: int) -> Peer | None:
        """The peer if connected; None while its handshake runs; raises PeerUnavailableError once it failed."""
        key = (engine_id, rank)
        if key in self._ready:
            return self._ready[key]
        fut = self._pending.get(key)
        if fut is not None:
            if not fut.done():
                return None
            del self._pending[key]
            try:
                self._ready[key] = fut.result()
                logger.info("SplitZipConnector: connected to prefill engine %s rank %d (agent %s)", engine_id,
                            rank, self._ready[key].agent)
                return self._ready[key]
            except (HandshakeError, IncompatiblePeerError, TransportError, msgspec.DecodeError,
                    msgspec.ValidationError) as e:
                msg = f"handshake with prefill engine {engine_id} rank {rank} at {host}:{port} failed: {e}"
                logger.error("SplitZipConnector: %s", msg)
                self._failed[key] = _Failure(time.monotonic(), msg)
        failed = self._failed.get(key)
        if failed is not None:
            if time.monotonic() - failed.at < RETRY_AFTER_S:
                raise PeerUnavailableError(failed.message)
            del self._failed[key]
        self._pending[key] = self._pool.submit(self._connect, engine_id, host, port, rank)
        return None

    def connected(self, engine_id: str) -> list[Peer]:
        return [p for (e, _), p in self._ready.items() if e == engine_id]

    def drop(self, engine_id: str, rank: int) -> None:
        """Forget a peer after a transport error (the next request handshakes again)."""
        peer = self._ready.pop((engine_id, rank), None)
        if peer is not None:
            self._transport.remove_peer(peer.agent)

    def _connect(self, engine_id: str, host: str, port: int, rank: int) -> Peer:
        raw = self._fetch(host, port, rank, self._timeout_s)
        err = _error_reply(raw)
        if err:
            raise HandshakeError(f"prefill side channel refused: {err}")
        info = msgspec.msgpack.decode(raw, type=Handshake)
        self._check(info, engine_id)
        return Peer(self._transport.add_peer(info.agent_metadata), info)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for peer in self._ready.values():
            self._transport.remove_peer(peer.agent)
        self._ready.clear()


def _error_reply(raw: bytes) -> str:
    """The side channel answers ``{"error": ...}`` for an unknown rank or a bad request."""
    try:
        obj = msgspec.msgpack.decode(raw)
    except msgspec.DecodeError:
        return ""
    return str(obj["error"]) if isinstance(obj, dict) and "error" in obj else ""
