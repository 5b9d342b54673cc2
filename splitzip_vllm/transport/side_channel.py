"""ZMQ side channel: the prefill engine serves each worker's handshake payload; decode workers fetch it."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import msgspec
import zmq

logger = logging.getLogger(__name__)

_REQ_TAG = b"splitzip_meta"


class HandshakeError(RuntimeError):
    """The peer could not be reached or answered something unusable."""


class SideChannelServer:
    """ROUTER socket on ``tcp://host:port`` answering ``(tag, tp_rank)`` with that rank's payload bytes.

    It runs in its own process: the payloads are fixed at start-up, and a thread inside vLLM's EngineCore would
    compete for the GIL with the engine's busy loop (measured here: handshakes answered only after the engine
    went idle, tens of seconds later, with TP 2 on a loaded host).
    """

    def __init__(self, host: str, port: int, payloads: dict[int, bytes]):
        self.addr = f"tcp://{'*' if host in ('0.0.0.0', '') else host}:{port}"
        self._proc = subprocess.Popen([sys.executable, "-m", __name__, self.addr, str(os.getpid())],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self._proc.stdin.write(msgspec.msgpack.encode(payloads))
        self._proc.stdin.close()
        line = self._proc.stdout.readline().strip()
        if line != b"ready":
            self.close()
            raise HandshakeError(f"the side channel could not listen on {self.addr} ({line.decode() or 'exited'}; "
                                 "port in use? set VLLM_NIXL_SIDE_CHANNEL_PORT or "
                                 "kv_connector_extra_config.side_channel_port)")
        logger.info("SplitZip side channel listening on %s for TP ranks %s (pid %d)", self.addr, sorted(payloads),
                    self._proc.pid)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()


def _serve(addr: str, parent: int) -> None:
    """Child process: read the payloads from stdin, answer handshake requests until the parent is gone."""
    payloads = {int(k): v for k, v in msgspec.msgpack.decode(sys.stdin.buffer.read()).items()}
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind(addr)
    except zmq.ZMQError as e:
        print(f"bind failed: {e}", flush=True)
        return
    print("ready", flush=True)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while os.getppid() == parent:
        if not poller.poll(500):
            continue
        frames = sock.recv_multipart()
        sock.send_multipart([frames[0], b"", _answer(frames[-1], payloads)])
    sock.close(0)
    ctx.term()


def _answer(msg: bytes, payloads: dict[int, bytes]) -> bytes:
    try:
        tag, rank = msgspec.msgpack.decode(msg)
        if tag != _REQ_TAG:
            raise ValueError(f"unknown request {tag!r}")
        reply = payloads.get(int(rank))
        if reply is None:
            reply = msgspec.msgpack.encode({"error": f"no worker with TP rank {rank} on this engine"})
    except Exception as e:
        reply = msgspec.msgpack.encode({"error": f"bad handshake request: {e}"})
    return reply


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


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
