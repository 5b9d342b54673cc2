"""Test-only connectors for the E2E suite: SplitZipConnector whose decode transport corrupts received payloads
(and one whose payload READs are slow).

Servers load it with ``"kv_connector": "CorruptingSplitZipConnector", "kv_connector_module_path": "e2e_faults"``
(tests/ on PYTHONPATH). It wraps the real NIXL transport: every completed READ into the receive buffer gets one
byte of its first payload body flipped, after the data landed and before the codec sees it.
"""
from __future__ import annotations

import ctypes

from splitzip_vllm.connector import SplitZipConnector

_BODY_OFFSET = 150   # past the 96-byte header: inside the payload body


class CorruptingSplitZipConnector(SplitZipConnector):
    def register_kv_caches(self, kv_caches):
        super().register_kv_caches(kv_caches)
        consumer = self.worker.consumer
        if consumer is None:
            return
        transport = consumer.transport
        real_poll, real_read = transport.poll, transport.read
        lo = consumer.recv_buf.data_ptr()
        hi = lo + consumer.recv_buf.numel()
        pending: dict[int, tuple[int, int]] = {}   # id(handle) -> first local range of a READ into the buffer

        def read(peer, local, *args, **kwargs):
            handle = real_read(peer, local, *args, **kwargs)
            if local and lo <= local[0][0] < hi and local[0][1] > _BODY_OFFSET:
                pending[id(handle)] = local[0]
            return handle

        def poll(handle):
            state = real_poll(handle)
            if state == "DONE" and id(handle) in pending:
                addr, _ = pending.pop(id(handle))
                ctypes.c_ubyte.from_address(addr + _BODY_OFFSET).value ^= 0x5A
            return state
        transport.poll, transport.read = poll, read


SLOW_READ_S = 0.25   # SlowSplitZipConnector: a READ into the receive buffer completes no sooner than this


class SlowSplitZipConnector(SplitZipConnector):
    """Decode whose payload READs complete no sooner than ``SLOW_READ_S`` after they were issued (a slow link),
    so a test can kill prefill while a transfer is surely in flight."""

    def register_kv_caches(self, kv_caches):
        super().register_kv_caches(kv_caches)
        consumer = self.worker.consumer
        if consumer is None:
            return
        import time
        transport = consumer.transport
        real_poll, real_read = transport.poll, transport.read
        lo = consumer.recv_buf.data_ptr()
        hi = lo + consumer.recv_buf.numel()
        issued: dict[int, float] = {}

        def read(peer, local, *args, **kwargs):
            handle = real_read(peer, local, *args, **kwargs)
            if local and lo <= local[0][0] < hi:
                issued[id(handle)] = time.monotonic()
            return handle

        def poll(handle):
            state = real_poll(handle)
            t = issued.get(id(handle))
            if t is not None and state == "DONE":
                if time.monotonic() - t < SLOW_READ_S:
                    return "PROC"
                del issued[id(handle)]
            return state
        transport.poll, transport.read = poll, read
