"""The transport interface the connector needs (NIXL implements it; tests use an in-process fake)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

Range = tuple[int, int]  # (address, length)


class TransportError(RuntimeError):
    """A transfer operation failed (peer unreachable, transfer error, bad metadata)."""


@dataclass
class TransferTelemetry:
    seconds: float
    nbytes: int
    descriptors: int


class Transport(Protocol):
    name: str

    def register(self, ranges: Sequence[Range], mem_type: str, device_id: int = 0) -> None: ...

    def metadata(self) -> bytes: ...

    def add_peer(self, metadata: bytes) -> str: ...

    def remove_peer(self, name: str) -> None: ...

    def read(self, peer: str, local: Sequence[Range], local_mem: str, remote: Sequence[Range], remote_mem: str,
             notif: bytes, local_dev: int = 0, remote_dev: int = 0) -> Any:
        """Start a READ of ``remote`` ranges on ``peer`` into ``local``; ``notif`` (if not empty) reaches the
        peer once the READ completed. Raises :class:`TransportError`."""

    def poll(self, handle: Any) -> str:
        """``"DONE"``, ``"PROC"`` or ``"ERR"``."""

    def telemetry(self, handle: Any) -> TransferTelemetry | None: ...

    def release(self, handle: Any) -> bool:
        """False when the transport refuses (DMA may still be in flight)."""

    def notify(self, peer: str, msg: bytes) -> bool: ...

    def notifications(self) -> list[bytes]: ...

    def close(self) -> None: ...
