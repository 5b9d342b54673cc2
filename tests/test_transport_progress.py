"""NIXL progress thread: event-driven (``progress_delay_us`` > 0) still serves READs, and does not spin.

Real NIXL agents over UCX (TCP on loopback, so the target must progress to serve the READ: UCX emulates RMA
over TCP with active messages).
"""
from __future__ import annotations

import os
import resource
import time

import pytest
import torch

nixl = pytest.importorskip("nixl._api")

from splitzip_vllm.transport.nixl_agent import NixlTransport  # noqa: E402


@pytest.fixture(autouse=True)
def _ucx_tcp(monkeypatch):
    monkeypatch.setenv("UCX_TLS", "tcp")
    monkeypatch.setenv("UCX_NET_DEVICES", "lo")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _wait_md(tr: NixlTransport, peer: str, timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while not tr.agent.check_remote_metadata(peer):
        assert time.monotonic() - t0 < timeout, "peer metadata never loaded"
        time.sleep(0.01)


def test_event_driven_progress_serves_reads_without_target_calls():
    """The target never calls NIXL after set-up; its (event-driven) progress thread alone serves the READ."""
    n = 8 << 20
    src = torch.arange(n, dtype=torch.int64).to(torch.uint8)
    dst = torch.zeros(n, dtype=torch.uint8)
    tgt = NixlTransport(f"szt-tgt-{os.getpid()}", progress_delay_us=1000)
    ini = NixlTransport(f"szt-ini-{os.getpid()}", progress_delay_us=1000)
    try:
        tgt.register([(src.data_ptr(), n)], "DRAM")
        ini.register([(dst.data_ptr(), n)], "DRAM")
        peer = ini.add_peer(tgt.metadata())
        _wait_md(ini, peer)
        h = ini.read(peer, [(dst.data_ptr(), n)], "DRAM", [(src.data_ptr(), n)], "DRAM", b"done")
        t0 = time.monotonic()
        state = "PROC"
        while state == "PROC" and time.monotonic() - t0 < 20:
            state = ini.poll(h)
        assert state == "DONE"
        ini.release(h)
        assert torch.equal(dst, src)
        # the notification reached the target without it ever polling before now
        t0 = time.monotonic()
        got: list[bytes] = []
        while not got and time.monotonic() - t0 < 5:
            got = tgt.notifications()
        assert got == [b"done"]
    finally:
        ini.close()
        tgt.close()


def test_event_driven_progress_thread_is_idle_when_nothing_moves():
    """Two idle agents: NIXL's default (pthrDelay 0) spins a core each; the event-driven ones sleep."""
    agents = [NixlTransport(f"szt-idle{i}-{os.getpid()}", progress_delay_us=1000) for i in range(2)]
    try:
        time.sleep(0.2)
        c0, w0 = _cpu_s(), time.monotonic()
        time.sleep(1.5)
        used = (_cpu_s() - c0) / (time.monotonic() - w0)
        # a spinning progress thread alone would use ~1.0 core-second per second (each agent has one)
        assert used < 0.25, f"idle agents used {used:.2f} core-s per s: the progress thread is spinning"
    finally:
        for a in agents:
            a.close()
