"""State of one decode-side KV load: its sources (prefill TP ranks read from) and progress (consumer.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .contracts import Manifest
from .kv_layout import PiecePlan
from .metadata import RecvRequest
from .peers import Peer

INDEX_POLL_S = (0.0005, 0.008)  # index READ interval per source: doubles while nothing new is ready


class LoadError(RuntimeError):
    def __init__(self, msg: str, *, rejected: bool = False, peer_lost: bool = False):
        super().__init__(msg)
        self.rejected, self.peer_lost = rejected, peer_lost


@dataclass
class Source:
    rank: int                       # prefill TP rank
    manifest: Manifest | None       # None until a layer-wise transfer's mailbox entry is found
    plan: PiecePlan | None
    head_lo: int                    # prefill-local heads read from this rank
    head_hi: int
    head_shift: int                 # decode-local head = prefill-local head + head_shift
    reader: int
    readers: int
    todo: set[int] = field(default_factory=set)
    located: dict[int, tuple[int, int]] = field(default_factory=dict)   # ready, not fetched yet
    peer: Peer | None = None
    asked: bool = False
    index_read: tuple | None = None   # (handle, landing offset, bytes, first entry)
    mailbox_read: tuple | None = None  # (handle, landing offset, bytes)
    last_index: float = 0.0
    index_every: float = INDEX_POLL_S[0]
    reads: list = field(default_factory=list)     # (handle, extent, [(piece, offset, length)])
    jobs: list = field(default_factory=list)      # (future, extent, pieces)
    direct: tuple | None = None       # (handle, phase "data" | "ticket")
    ticket_slot: int | None = None
    done: bool = False


@dataclass
class Load:
    rid: str
    req: RecvRequest
    sources: list[Source]
    progress: float
    wire: int = 0
    xfer_s: float = 0.0
    decode_s: float = 0.0
    error: str = ""                 # set when the load cannot even be planned (reported at the next poll)


def check_tp(prefill_tp: int, decode_tp: int, total_heads: int) -> None:
    """Refuse TP pairs whose KV heads do not split evenly (replicated heads are not supported)."""
    if total_heads % prefill_tp or total_heads % decode_tp:
        raise LoadError(f"prefill TP size {prefill_tp} and decode TP size {decode_tp} do not both divide the "
                        f"model's {total_heads} KV heads; choose TP sizes that divide {total_heads}")

