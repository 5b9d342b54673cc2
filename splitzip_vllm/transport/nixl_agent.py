"""Thin wrapper around one NIXL agent (UCX backend by default): registration, READ, notifications."""
from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import torch

from .base import Range, TransferTelemetry, TransportError

logger = logging.getLogger(__name__)

def mem_type_of(t: torch.Tensor) -> str:
    return "DRAM" if t.device.type == "cpu" else "VRAM"


_AGENT_CONFIG_LOCK = threading.Lock()


def _make_agent(name: str, cfg: Any, progress_delay_us: int) -> Any:
    """Create a ``nixl_agent`` whose progress thread sleeps in ``poll()`` between events.

    ``nixl._api.nixl_agent`` hard-codes ``pthrDelay = 0``: the UCX progress thread then polls its workers
    with a zero timeout, i.e. spins at 100 % of a core even when no transfer is in flight. With a positive
    delay the thread waits on the workers' event fds (woken by incoming data) and wakes at least every
    ``ceil(delay / 1 ms)`` ms. The Python API exposes no setting for it, so the agent is built with a
    config class whose ``pthrDelay`` ignores values below ``progress_delay_us``.
    """
    from nixl import _api

    if progress_delay_us <= 0:
        return _api.nixl_agent(name, cfg)
    base = getattr(getattr(_api, "nixlBind", None), "nixlAgentConfig", None)
    if base is None or not isinstance(getattr(base, "pthrDelay", None), property):
        logger.warning("this NIXL version does not expose nixlAgentConfig.pthrDelay as expected; its progress "
                       "thread keeps NIXL's default (busy poll)")
        return _api.nixl_agent(name, cfg)

    class _DelayedProgressConfig(base):  # type: ignore[misc, valid-type]
        @property
        def pthrDelay(self) -> int:  # noqa: N802 - NIXL's name
            return base.pthrDelay.__get__(self)

        @pthrDelay.setter
        def pthrDelay(self, value: int) -> None:  # noqa: N802
            base.pthrDelay.__set__(self, max(int(value), progress_delay_us))

    with _AGENT_CONFIG_LOCK:
        _api.nixlBind.nixlAgentConfig = _DelayedProgressConfig
        try:
            return _api.nixl_agent(name, cfg)
        finally:
            _api.nixlBind.nixlAgentConfig = base


class NixlTransport:
    """One NIXL agent. Import of ``nixl`` happens here, never at package import time.

    ``progress_delay_us`` > 0 makes NIXL's progress thread event-driven instead of busy-polling (see
    :func:`_make_agent`); 0 keeps NIXL's default.
    """

    def __init__(self, name: str, backends: Sequence[str] = ("UCX",), num_threads: int = 0,
                 progress_delay_us: int = 0):
        try:
            from nixl._api import nixl_agent_config
        except ImportError as e:  # pragma: no cover - depends on install
            raise TransportError("NIXL is not installed: pip install nixl (see README)") from e
        self.name = name
        self.backends = list(backends)
        self.progress_delay_us = int(progress_delay_us)
        cfg = nixl_agent_config(backends=self.backends, capture_telemetry=True, num_threads=num_threads)
        self.agent = _make_agent(name, cfg, self.progress_delay_us)
        self._registered: list[Any] = []

    # ---- memory -------------------------------------------------------------------------------------
    def register(self, ranges: Sequence[Range], mem_type: str, device_id: int = 0) -> None:
        descs = self.agent.get_reg_descs([(a, n, device_id, "") for a, n in ranges], mem_type)
        self.agent.register_memory(descs, backends=self.backends)
        self._registered.append(descs)

    def metadata(self) -> bytes:
        return self.agent.get_agent_metadata()

    # ---- peers --------------------------------------------------------------------------------------
    def add_peer(self, metadata: bytes) -> str:
        try:
            return self.agent.add_remote_agent(metadata)
        except Exception as e:
            raise TransportError(f"cannot load the peer's NIXL agent metadata: {e}") from e

    def remove_peer(self, name: str) -> None:
        try:
            self.agent.remove_remote_agent(name)
        except Exception:  # already gone
            pass

    # ---- transfers ----------------------------------------------------------------------------------
    def read(self, peer: str, local: Sequence[Range], local_mem: str, remote: Sequence[Range],
             remote_mem: str, notif: bytes, local_dev: int = 0, remote_dev: int = 0) -> Any:
        """Start a READ of ``remote`` ranges (on ``peer``) into ``local`` ranges; returns a handle."""
        if len(local) != len(remote):
            raise ValueError("local and remote descriptor lists differ in length")
        try:
            ldesc = self.agent.get_xfer_descs([(a, n, local_dev) for a, n in local], local_mem)
            rdesc = self.agent.get_xfer_descs([(a, n, remote_dev) for a, n in remote], remote_mem)
            handle = self.agent.initialize_xfer("READ", ldesc, rdesc, peer, notif)
            state = self.agent.transfer(handle)
        except Exception as e:
            raise TransportError(f"NIXL READ from {peer} could not start: {e}") from e
        if state == "ERR":
            self.release(handle)
            raise TransportError(f"NIXL READ from {peer} failed to start")
        return handle

    def poll(self, handle: Any) -> str:
        """``"DONE"``, ``"PROC"`` or ``"ERR"``."""
        try:
            return self.agent.check_xfer_state(handle)
        except Exception as e:
            logger.warning("NIXL check_xfer_state raised: %s", e)
            return "ERR"

    def telemetry(self, handle: Any) -> TransferTelemetry | None:
        try:
            t = self.agent.get_xfer_telemetry(handle)
            return TransferTelemetry(t.xferDuration / 1e6, t.totalBytes, t.descCount)
        except Exception:
            return None

    def release(self, handle: Any) -> bool:
        """Release a transfer handle; False when NIXL refuses (DMA may still be in flight)."""
        try:
            self.agent.release_xfer_handle(handle)
            return True
        except Exception as e:
            logger.debug("NIXL release_xfer_handle refused: %s", e)
            return False

    def notify(self, peer: str, msg: bytes) -> bool:
        try:
            self.agent.send_notif(peer, msg)
            return True
        except Exception as e:
            logger.warning("NIXL notification to %s failed: %s", peer, e)
            return False

    def notifications(self) -> list[bytes]:
        out: list[bytes] = []
        for msgs in self.agent.get_new_notifs().values():
            out.extend(msgs)
        return out

    def close(self) -> None:
        for descs in self._registered:
            try:
                self.agent.deregister_memory(descs, backends=self.backends)
            except Exception:
                pass
        self._registered.clear()
