"""In-process stand-in for NIXL: registered memory, READs done with memmove, notifications in queues.

READs copy when they are first polled (not when posted), so a test can change or free prefill memory between
posting and completion, as a slow network would let happen. Faults are set per transport by the test.

Host-to-host READs (both sides ``DRAM``) are plain memmoves. When either side is ``VRAM`` the copy goes through
CUDA (torch views of the registered addresses, or ``cudaMemcpy`` with ``cudaMemcpyDefault`` as a fallback) and
the device is synchronised before the READ reports ``DONE``, as NIXL guarantees that a completed READ's data is
in place: the consumer then decodes it on its own (non-blocking) stream.
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
    local_mem: str = "DRAM"
    remote_mem: str = "DRAM"
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
        x = _Xfer(peer, list(local), list(remote), notif, local_mem, remote_mem, polls_left=self.read_latency_polls)
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
        if x.local_mem == "DRAM" and x.remote_mem == "DRAM":
            for (la, n), (ra, _) in zip(x.local, x.remote):
                ctypes.memmove(la, ra, n)
                self.bytes_read += n
        else:
            for (la, n), (ra, _) in zip(x.local, x.remote):
                device_copy(la, x.local_mem, ra, x.remote_mem, n)
                self.bytes_read += n
            device_synchronize()
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


# ---- copies that involve device memory ---------------------------------------------------------------------------
class _CudaRange:
    """``n`` bytes of device memory at ``addr``, for ``torch.as_tensor`` (CUDA array interface, no copy)."""

    def __init__(self, addr: int, n: int):
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (addr, False),
                                         "strides": None, "version": 2}


def _bytes_view(addr: int, n: int, mem: str):
    import torch
    if mem == "DRAM":
        return torch.frombuffer((ctypes.c_ubyte * n).from_address(addr), dtype=torch.uint8)
    return torch.as_tensor(_CudaRange(addr, n))


_cudart = None


def _load_cudart():
    """The CUDA runtime torch loaded (found in this process's mappings), else one on the library path."""
    global _cudart
    if _cudart is None:
        import ctypes.util
        import torch
        torch.cuda.init()
        paths = []
        try:
            with open("/proc/self/maps") as f:
                paths = sorted({line.split()[-1] for line in f if "libcudart" in line and "/" in line})
        except OSError:
            pass
        for name in [*paths, "libcudart.so.12", "libcudart.so.13", "libcudart.so", ctypes.util.find_library("cudart")]:
            if not name:
                continue
            try:
                lib = ctypes.CDLL(name)
                lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                lib.cudaMemcpy.restype = ctypes.c_int
                _cudart = lib
                break
            except (OSError, AttributeError):
                continue
        if _cudart is None:
            raise RuntimeError("fake transport: cannot find libcudart for a device-memory READ")
    return _cudart


_use_torch = True
CUDA_MEMCPY_DEFAULT = 4


def device_copy(dst: int, dst_mem: str, src: int, src_mem: str, n: int) -> None:
    """Copy ``n`` bytes from ``src`` to ``dst`` where either side may be device memory (``VRAM``)."""
    global _use_torch
    if n == 0:
        return
    if _use_torch:
        try:
            _bytes_view(dst, n, dst_mem).copy_(_bytes_view(src, n, src_mem))
            return
        except (TypeError, RuntimeError, ValueError):
            _use_torch = False   # this torch cannot wrap raw device pointers: use the CUDA runtime
    rc = _load_cudart().cudaMemcpy(dst, src, n, CUDA_MEMCPY_DEFAULT)
    if rc != 0:
        raise RuntimeError(f"fake transport: cudaMemcpy({dst:#x}, {src:#x}, {n}) failed with CUDA error {rc}")


def device_synchronize() -> None:
    import torch
    torch.cuda.synchronize()
