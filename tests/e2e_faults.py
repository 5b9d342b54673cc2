"""Test-only connectors for the E2E suite: SplitZipConnector whose decode transport misbehaves on the payload
READs into its receive buffer.

Servers load them with ``"kv_connector": "<class name>", "kv_connector_module_path": "e2e_faults"`` (tests/ on
PYTHONPATH). Each wraps the real NIXL transport:

* :class:`CorruptingSplitZipConnector`: every completed READ into the receive buffer gets one byte of its first
  payload body flipped, after the data landed and before the codec sees it;
* :class:`SlowSplitZipConnector`: such a READ completes no sooner than ``SLOW_READ_S`` after it was issued (a slow
  link), so a test can kill prefill while a transfer is surely in flight.
"""
from __future__ import annotations

import ctypes
import time

from splitzip_vllm.connector import SplitZipConnector

_BODY_OFFSET = 150   # past the 96-byte header: inside the payload body
SLOW_READ_S = 0.25


def wrap_payload_reads(connector: SplitZipConnector, on_done) -> None:
    """Make the decode transport call ``on_done(first local range, seconds since issue)`` when a READ into the
    receive buffer completes; ``on_done`` returns False to report it still in progress."""
    consumer = connector.worker.consumer
    if consumer is None:
        return
    transport = consumer.transport
    real_poll, real_read = transport.poll, transport.read
    lo = consumer.recv_buf.data_ptr()
    hi = lo + consumer.recv_buf.numel()
    pending: dict[int, tuple[tuple[int, int], float]] = {}   # id(handle) -> (first local range, issue time)

    def read(peer, local, *args, **kwargs):
        handle = real_read(peer, local, *args, **kwargs)
        if local and lo <= local[0][0] < hi:
            pending[id(handle)] = (local[0], time.monotonic())
        return handle

    def poll(handle):
        state = real_poll(handle)
        if state == "DONE" and id(handle) in pending:
            first, t0 = pending[id(handle)]
            if not on_done(first, time.monotonic() - t0):
                return "PROC"
            del pending[id(handle)]
        return state
    transport.poll, transport.read = poll, read


class CorruptingSplitZipConnector(SplitZipConnector):
    def register_kv_caches(self, kv_caches):
        super().register_kv_caches(kv_caches)

        def flip(first, _age):
            addr, size = first
            if size > _BODY_OFFSET:
                ctypes.c_ubyte.from_address(addr + _BODY_OFFSET).value ^= 0x5A
            return True
        wrap_payload_reads(self, flip)


class SlowSplitZipConnector(SplitZipConnector):
    def register_kv_caches(self, kv_caches):
        super().register_kv_caches(kv_caches)
        wrap_payload_reads(self, lambda _first, age: age >= SLOW_READ_S)
