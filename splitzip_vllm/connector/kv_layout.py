"""Geometry of vLLM's paged KV tensors, and the unit the connector moves: one *piece* = one KV head of one block
of one layer (K and V together).

Pieces make every topology a matter of choosing pieces: a decode TP rank reads exactly the heads it serves from
whichever prefill ranks hold them (heterogeneous TP), and skips the blocks it already has (prefix hits).

Supported tensor layouts (``kind``; ``N`` blocks, ``B`` tokens per block, ``H`` local KV heads, ``D`` head size):

* ``cpu``        ``[N, H, B, 2*D]``   vLLM's CPU attention backend; a piece is one contiguous ``[B, 2*D]`` slab
* ``flash``      ``[2, N, B, H, D]``  FlashAttention (K, V first); a piece is ``K[b, :, h]`` then ``V[b, :, h]``,
                                     contiguous when vLLM allocates HND (``[2, N, H, B, D]`` physically)
* ``flashinfer`` ``[N, 2, B, H, D]``  FlashInfer; as ``flash`` with the K/V axis after the block axis

The element order inside a piece (``piece_order``) must match between prefill and decode: ``cpu`` interleaves K
and V per token, the others put all of K before V. The handshake compares it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("cpu", "flash", "flashinfer")
_PIECE_ORDER = {"cpu": "token-interleaved-kv", "flash": "k-then-v", "flashinfer": "k-then-v"}


class LayoutError(ValueError):
    """A KV tensor has a shape or stride this connector cannot move."""


@dataclass(frozen=True)
class KVGeometry:
    """What a KV tensor is expected to hold on this worker (``num_blocks`` 0: taken from the tensor)."""
    block_size: int
    num_heads: int          # KV heads on this TP rank
    head_size: int
    num_blocks: int = 0

    def shapes(self, n: int | str = "N") -> dict[str, tuple]:
        b, h, d = self.block_size, self.num_heads, self.head_size
        return {"cpu": (n, h, b, 2 * d), "flash": (2, n, b, h, d), "flashinfer": (n, 2, b, h, d)}


_BLOCK_DIM = {"cpu": 0, "flash": 1, "flashinfer": 0}


def detect_layout(t: torch.Tensor, geo: KVGeometry) -> str:
    """The layout kind of ``t``, or :class:`LayoutError` naming the shapes that were expected."""
    for kind in LAYOUTS:
        n = t.shape[_BLOCK_DIM[kind]] if t.dim() == len(geo.shapes()[kind]) else -1
        if tuple(t.shape) == geo.shapes(n)[kind] and (not geo.num_blocks or n == geo.num_blocks):
            return kind
    raise LayoutError(f"KV cache tensor of shape {tuple(t.shape)} matches none of the supported layouts for "
                      f"{geo.num_blocks or 'N'} blocks x {geo.block_size} tokens x {geo.num_heads} KV heads x "
                      f"{geo.head_size}: {geo.shapes(geo.num_blocks or 'N')}")


@dataclass
class LayerKV:
    """One layer's paged KV tensor (shared tensors of several layers appear once)."""
    name: str
    tensor: torch.Tensor
    kind: str

    @property
    def piece_order(self) -> str:
        return _PIECE_ORDER[self.kind]

    @property
    def num_blocks(self) -> int:
        return self.tensor.shape[_BLOCK_DIM[self.kind]]

    def blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of the given blocks (block axis first for every layout): for KV dumps and calibration."""
        idx = torch.tensor(block_ids, device=self.tensor.device)
        return self.tensor.index_select(_BLOCK_DIM[self.kind], idx).movedim(_BLOCK_DIM[self.kind], 0)

    def piece(self, block: int, head: int) -> list[torch.Tensor]:
        """Views whose concatenation is the piece (block, head), in piece order."""
        t = self.tensor
        if self.kind == "cpu":
            return [t[block, head]]
        if self.kind == "flash":
            return [t[0, block, :, head], t[1, block, :, head]]
        return [t[block, 0, :, head], t[block, 1, :, head]]

    def spec(self) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        """(base address, shape, strides in elements): what a peer needs to address this layer's pieces."""
        t = self.tensor
        return t.data_ptr(), tuple(t.shape), tuple(t.stride())

    def piece_ranges(self, block: int, head: int) -> list[tuple[int, int]]:
        base, shape, strides = self.spec()
        return piece_ranges(self.kind, base, shape, strides, self.tensor.element_size(), block, head)


def piece_ranges(kind: str, base: int, shape: tuple[int, ...], strides: tuple[int, ...], esize: int,
                 block: int, head: int) -> list[tuple[int, int]]:
    """(address, length) ranges of piece (block, head) of a layer tensor described by base/shape/strides, in
    piece order: how decode addresses prefill's raw KV (and its own), from the handshake's layer specs."""
    s = strides
    if kind == "cpu":            # t[block, head]: rows = tokens, cols = 2*D
        views = [(block * s[0] + head * s[1], shape[2], shape[3], s[2], s[3])]
    elif kind == "flash":        # t[kv, block, :, head, :]
        views = [(kv * s[0] + block * s[1] + head * s[3], shape[2], shape[4], s[2], s[4]) for kv in (0, 1)]
    elif kind == "flashinfer":   # t[block, kv, :, head, :]
        views = [(block * s[0] + kv * s[1] + head * s[3], shape[2], shape[4], s[2], s[4]) for kv in (0, 1)]
    else:
        raise LayoutError(f"unknown KV layout {kind!r}")
    out: list[tuple[int, int]] = []
    for off, rows, cols, row_stride, col_stride in views:
        if col_stride != 1:
            raise LayoutError(f"KV layout {kind} with strides {strides} has no contiguous head dimension")
        if row_stride == cols:
            out.append((base + off * esize, rows * cols * esize))
        else:
            out += [(base + (off + i * row_stride) * esize, cols * esize) for i in range(rows)]
    return out


def coalesce(local: list[tuple[int, int]], remote: list[tuple[int, int]]) -> tuple[list, list]:
    """Merge consecutive descriptor pairs that are adjacent on both sides (fewer, larger NIXL descriptors)."""
    lo: list[list[int]] = []
    ro: list[list[int]] = []
    for (la, ln), (ra, rn) in zip(local, remote):
        if ln != rn:
            raise LayoutError(f"descriptor lengths differ: local {ln}, remote {rn}")
        if lo and lo[-1][0] + lo[-1][1] == la and ro[-1][0] + ro[-1][1] == ra:
            lo[-1][1] += ln
            ro[-1][1] += rn
        else:
            lo.append([la, ln])
            ro.append([ra, rn])
    return [tuple(x) for x in lo], [tuple(x) for x in ro]


class KVLayout:
    """All layers of one worker's KV cache, with the geometry checks done once at registration."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], geo: KVGeometry):
        self.geo = geo
        self.layers: list[LayerKV] = []
        seen: dict[int, int] = {}
        self._index: dict[str, int] = {}   # layer name (as save_kv_layer gives it) -> index into layers
        for name, t in kv_caches.items():
            if t.data_ptr() not in seen:   # layers sharing one cache tensor appear more than once
                seen[t.data_ptr()] = len(self.layers)
                self.layers.append(LayerKV(name, t, detect_layout(t, geo)))
            self._index[name] = seen[t.data_ptr()]
        if not self.layers:
            raise LayoutError("vLLM registered no KV cache tensors")
        kinds = {l.kind for l in self.layers}
        if len(kinds) != 1:
            raise LayoutError(f"KV cache layers use different layouts {sorted(kinds)}")
        if len({l.num_blocks for l in self.layers}) != 1:
            raise LayoutError("KV cache layers hold different block counts")
        t0 = self.layers[0].tensor
        self.num_blocks = self.layers[0].num_blocks
        self.kind = self.layers[0].kind
        self.dtype, self.device = t0.dtype, t0.device
        self.element_size = t0.element_size()

    def index_of(self, layer_name: str) -> int | None:
        return self._index.get(layer_name)

    @property
    def piece_order(self) -> str:
        return self.layers[0].piece_order

    @property
    def piece_elems(self) -> int:
        return self.geo.block_size * 2 * self.geo.head_size

    @property
    def piece_bytes(self) -> int:
        return self.piece_elems * self.element_size

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers and local heads (the unit of vLLM's KV budget)."""
        return self.piece_bytes * self.geo.num_heads * len(self.layers)

    def storages(self) -> list[tuple[int, int]]:
        """(address, bytes) of every distinct storage holding KV (what the transport registers)."""
        out: dict[int, int] = {}
        for l in self.layers:
            s = l.tensor.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
        return sorted(out.items())

    def describe(self) -> str:
        g = self.geo
        return (f"{len(self.layers)} layers x {self.num_blocks} blocks x {g.block_size} tokens x {g.num_heads} KV "
                f"heads x {g.head_size} ({self.kind}, {self.dtype})")


def blocks_per_piece(block_size: int, piece_tokens: int) -> int:
    """Blocks in one piece: pieces of about ``piece_tokens`` tokens (small GPU blocks are grouped)."""
    return max(1, piece_tokens // block_size)


@dataclass(frozen=True)
class PiecePlan:
    """Numbering of one request's pieces on one prefill rank: ``number = (layer * heads + head) * runs + run``,
    run ``j`` covering blocks ``[j * bpp, min((j + 1) * bpp, num_blocks))`` of the request."""
    num_layers: int
    num_heads: int
    num_blocks: int
    bpp: int

    @property
    def runs(self) -> int:
        return -(-self.num_blocks // self.bpp)

    @property
    def count(self) -> int:
        return self.num_layers * self.num_heads * self.runs

    def number(self, layer: int, head: int, run: int) -> int:
        return (layer * self.num_heads + head) * self.runs + run

    def layer_pieces(self, layer: int) -> range:
        """The numbers of one layer's pieces (they are consecutive)."""
        return range(self.number(layer, 0, 0), self.number(layer + 1, 0, 0))

    def coords(self, number: int) -> tuple[int, int, int]:
        lh, run = divmod(number, self.runs)
        layer, head = divmod(lh, self.num_heads)
        return layer, head, run

    def blocks(self, run: int) -> range:
        return range(run * self.bpp, min((run + 1) * self.bpp, self.num_blocks))

    def wanted(self, head_lo: int, head_hi: int, block_lo: int) -> list[int]:
        """Pieces holding heads [head_lo, head_hi) of blocks >= block_lo, in (layer, head, run) order."""
        first_run = block_lo // self.bpp
        return [self.number(l, h, j) for l in range(self.num_layers) for h in range(head_lo, head_hi)
                for j in range(first_run, self.runs)]
