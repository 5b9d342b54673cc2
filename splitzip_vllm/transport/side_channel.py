"""ZMQ side channel: the prefill engine serves each worker's handshake payload; decode workers fetch it."""
from __future__ import annotations

import logging
import threading

import msgspec
import zmq

logger = logging.getLogger(__name__)

_REQ_TAG = b"splitzip_meta"


class HandshakeError(RuntimeError):
    """The peer could not be reached or answered something unusable."""


class SideChannelServer:
    """ROUTER socket on ``tcp://host:port`` answering ``(tag, tp_rank)`` with that rank's payload bytes."""

    def __init__(self, host: str, port: int, payloads: dict[int, bytes]):
        self.addr = f"tcp://{'*' if host in ('0.0.0.0', '') else host}:{port}"
        self._payloads = payloads
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(self.addr)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="splitzip-side-channel", daemon=True)
        self._thread.start()
        logger.info("SplitZip side channel listening on %s for TP ranks %s", self.addr, sorted(payloads))

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(200):
                continue
            frames = self._sock.recv_multipart()
            ident, msg = frames[0], frames[-1]
            try:
                tag, rank = msgspec.msgpack.decode(msg)
                if tag != _REQ_TAG:
                    raise ValueError(f"unknown request {tag!r}")
                reply = self._payloads.get(int(rank))
                if reply is None:
                    reply = msgspec.msgpack.encode({"error": f"no worker with TP rank {rank} on this engine"})
            except Exception as e:
                reply = msgspec.msgpack.encode({"error": f"bad handshake request: {e}"})
            self._sock.send_multipart([ident, b"", reply])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(0)
        self._ctx.term()


def fetch_handshake(host: str, port: int, tp_rank: int, timeout_s: float) -> bytes:
    """Ask a prefill engine's side channel for TP rank ``tp_rank``'s payload; raises HandshakeError."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    try:
        sock.connect(f"tcp://{host}:{port}")
        sock.send(msgspec.msgpack.encode((_REQ_TAG, tp_rank)))
        return sock.recv()
    except zmq.Again:
        raise HandshakeError(f"prefill side channel tcp://{host}:{port} did not answer within {timeout_s:.1f}s "
                             "(is the prefill server running and the port reachable?)") from None
    except zmq.ZMQError as e:
        raise HandshakeError(f"side channel tcp://{host}:{port}: {e}") from e
    finally:
        sock.close(0)
        ctx.term()
