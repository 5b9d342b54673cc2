"""In-process stand-in for NIXL: registered memory, READs done with memmove, notifications in queues.

READs copy when they are first polled (not when posted), so a test can change or free prefill memory between
posting and completion, as a slow network would let happen. Faults are set per transport by the test.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from splitzip_vllm.transport.base import TransferTelemetry, TransportError


class Fabric:
    def __init__(self):
        self.agents: dict[str, "FakeTransport"] = {}


@dataclass
class _Xfer:
    peer: str
    local: list
    remote: list
    notif: bytes
    state: str = "PROC"
    polls_left: int = 0


@dataclass
class FakeTransport:
    fabric: Fabric
    name: str
    regions: list[tuple[int, int, str]] = field(default_factory=list)
    inbox: list[bytes] = field(default_factory=list)
    peers: set[str] = field(default_factory=set)
    fail_reads: int = 0          # the next N reads end in ERR
    read_latency_polls: int = 0  # polls a READ stays in PROC
    reads: int = 0
    bytes_read: int = 0

    def __post_init__(self):
        self.fabric.agents[self.name] = self

    def register(self, ranges, mem_type, device_id=0):
        self.regions += [(a, n, mem_type) for a, n in ranges]

    def metadata(self) -> bytes:
        return self.name.encode()

    def add_peer(self, metadata: bytes) -> str:
        name = metadata.decode()
        if name not in self.fabric.agents:
            raise TransportError(f"unknown agent {name}")
        self.peers.add(name)
        return name

    def remove_peer(self, name: str) -> None:
        self.peers.discard(name)

    def _inside(self, who: "FakeTransport", ranges, mem) -> None:
        for a, n in ranges:
            if not any(ra <= a and a + n <= ra + rn and rm == mem for ra, rn, rm in who.regions):
                raise TransportError(f"range {a:#x}+{n} ({mem}) is not registered on {who.name}")

    def read(self, peer, local, local_mem, remote, remote_mem, notif, local_dev=0, remote_dev=0):
        if peer not in self.peers:
            raise TransportError(f"{peer} is not a peer of {self.name}")
        self._inside(self, local, local_mem)
        self._inside(self.fabric.agents[peer], remote, remote_mem)
        x = _Xfer(peer, list(local), list(remote), notif, polls_left=self.read_latency_polls)
        if self.fail_reads:
            self.fail_reads -= 1
            x.state = "ERR"
        self.reads += 1
        return x

    def poll(self, x: _Xfer) -> str:
        if x.state != "PROC":
            return x.state
        if x.polls_left:
            x.polls_left -= 1
            return "PROC"
        for (la, n), (ra, _) in zip(x.local, x.remote):
            ctypes.memmove(la, ra, n)
            self.bytes_read += n
        x.state = "DONE"
        if x.notif:
            self.fabric.agents[x.peer].inbox.append(x.notif)
        return "DONE"

    def telemetry(self, x) -> TransferTelemetry:
        return TransferTelemetry(0.0, sum(n for _, n in x.local), len(x.local))

    def release(self, x) -> bool:
        return True

    def notify(self, peer: str, msg: bytes) -> bool:
        self.fabric.agents[peer].inbox.append(msg)
        return True

    def notifications(self) -> list[bytes]:
        out, self.inbox = self.inbox, []
        return out

    def close(self) -> None:
        pass
