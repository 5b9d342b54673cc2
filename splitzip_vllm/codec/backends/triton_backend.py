"""Triton codec backend: FORMAT.md v2 payloads (v1 decoded too), byte-identical to ``reference``, for GPUs without
the CUDA extension (and for CPU tensors under ``TRITON_INTERPRET=1``, which is how it is tested without a GPU).

Importing this module never imports triton; the kernels (``..triton_kernels``, ``..triton_exp2l``) load on first use.

Encode (bfloat16 + codebook), no host synchronisation (the only host->device copies are the region table, from
pinned memory without blocking, and, once per device and codebook, two small constant tables):
  1. ``exp4_encode_pass1``: one program per tile (``min(2^chunk_log2, 2048)`` elements on a GPU; tiles never
     straddle a chunk) writes the sm bytes and packed codes, the tile's escape count and checksum terms;
  2. ``torch.cumsum`` of the tile counts (escape indices) and ``sum`` of the checksum terms, on the device;
  3. ``exp4_encode_pass2``: every program reads the escape total, decides EXP4 vs RAW (FORMAT.md §5.1) and
     either writes its escapes (``tl.cumsum`` over the tile's escape mask gives their order) and its chunk count,
     or copies its raw bytes (RAW fallback); program 0 writes the header (CRC-32 computed on the device) and the
     zero gaps between sections.
  The region list is handed to the kernels as a table of base addresses and start offsets (copied to the
  device from pinned memory, non-blocking); the regions are never concatenated. One region is passed directly.
RAW payloads (other dtypes, no codebook, or too small to gain): ``raw_encode_kernel`` + sum + ``raw_header_kernel``.
A two-level codebook (EXP2L allowed) first counts markers and both modes' escapes (``exp2l_encode_count``) and
chooses the mode on the device (``exp2l_encode_plan``, FORMAT.md §5); the EXP4 passes above then run with a skip
flag, and the EXP2L ones (``..triton_exp2l``) only write when EXP2L won: still no host synchronisation.

Decode: one 96-byte device-to-host copy for the header (validated on the host with ``format.parse_header``, the
transfer tag included, before any kernel runs);
the escape table is validated on the device (``exp4_validate_kernel``) into an ``ok`` flag that masks every
store of the decode kernels, so a corrupted table writes nothing; the dense kernel writes all elements, the patch
kernel overwrites the escaped ones and accounts for the checksum change; one final device-to-host copy brings the
validation results and the checksum back, and errors raise :class:`PayloadError`. The escape positions of a
chunk must be strictly ascending (FORMAT.md §6 step 4, as every decoder checks): that keeps every element patched
at most once, so the checksum adjustment is exact. Every load stays inside the payload (offsets come from the
validated header, escape indices are masked to ``< n_escapes``) and every store inside the destination (masked
by region bounds and by ``position < chunk length``), whatever the flag says. EXP2L payloads are decoded the same
way (``..triton_exp2l``): the count tables and each chunk's marker count join the validation first.
"""
from __future__ import annotations

import os
import sys
import zlib
from typing import Sequence

import torch

from ..codebook import Codebook
from ..format import (EXP2L_MARKER, EXP2L_MAX_SECONDARY, EXP2L_SEC_ESCAPE, HEADER_BYTES, LUT_ESCAPE, MAX_CODES,
                      MODE_EXP2L, MODE_RAW, Exp2lLayout, Exp4Layout, PayloadError, Status, check_destination,
                      check_tag, element_size, encode_capacity, exp4_allowed, parse_header)
from . import BackendUnavailableError, CodecBackend, register

_KMOD = "splitzip_vllm.codec.triton_kernels"
# Work per program. The payload bytes do not depend on these. Compiled (GPU) values, and larger ones for the
# interpreter, whose cost is dominated by a fixed overhead per program (tests also run the GPU values on CPU).
# exp2l: elements per tile (tiles may hold several chunks); sec: secondary code bytes packed per step;
# sec_chunks: chunks per program of exp2l_encode_finish.
GPU_TILES = {"exp4": 2048, "raw": 4096, "esc": 256, "exp2l": 2048, "sec": 1024, "sec_chunks": 16}
INTERPRETER_TILES = {"exp4": 16384, "raw": 65536, "esc": 4096, "exp2l": 16384, "sec": 4096, "sec_chunks": 64}
PLAN_BLOCK = 1024   # chunks per step of the one-program chunk scans (exp2l_*_plan)
TILES: dict[str, int] | None = None   # override (tests); None = by mode


def _tiles() -> dict[str, int]:
    if TILES is not None:
        return TILES
    return INTERPRETER_TILES if _mode() == "interpreted" else GPU_TILES


_triton_ok: bool | None = None


def _triton_importable() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _triton_ok = True
        except Exception:  # ImportError, or a broken install raising anything else at import
            _triton_ok = False
    return _triton_ok


def _mode() -> str:
    """``interpreted`` or ``compiled`` (how the kernels run, or will run once imported), or ``mixed``.

    ``triton.jit`` fixes the mode of a function when it is decorated: triton's own library when triton is imported,
    our kernels when ``..triton_kernels`` is. Both must agree (``TRITON_INTERPRET=1`` set before triton was
    imported) for the interpreter to work; ``mixed`` supports no device.
    """
    mod = sys.modules.get(_KMOD)
    kern = bool(mod.INTERPRETED) if mod is not None else os.environ.get("TRITON_INTERPRET") == "1"
    std_fn = getattr(sys.modules.get("triton.language.standard"), "sum", None)
    std = type(std_fn).__name__ == "InterpretedFunction" if std_fn is not None else kern
    if kern and std:
        return "interpreted"
    return "compiled" if not kern and not std else "mixed"


def _kernels():
    try:
        from .. import triton_kernels
    except Exception as e:  # pragma: no cover - depends on the triton install
        raise BackendUnavailableError(f"the triton codec kernels cannot be loaded: {e}") from e
    return triton_kernels


def _exp2l_kernels():
    try:
        from .. import triton_exp2l
    except Exception as e:  # pragma: no cover - depends on the triton install
        raise BackendUnavailableError(f"the triton EXP2L kernels cannot be loaded: {e}") from e
    return triton_exp2l


_const_cache: dict[tuple, torch.Tensor] = {}


def _crc_table(device: torch.device) -> torch.Tensor:
    """int64[8 * HEADER_BYTES + 1]: crc32 contribution of each header bit (96 bytes x 8 bits), then crc32 of
    96 zero bytes."""
    key = ("crc", str(device))
    t = _const_cache.get(key)
    if t is None:
        z = zlib.crc32(bytes(HEADER_BYTES))
        vals = []
        for i in range(HEADER_BYTES):
            for j in range(8):
                buf = bytearray(HEADER_BYTES)
                buf[i] = 1 << j
                vals.append(zlib.crc32(buf) ^ z)
        vals.append(z)
        t = torch.tensor(vals, dtype=torch.int64).to(device)
        _const_cache[key] = t
    return t


def _codebook_table(cb: Codebook, device: torch.device) -> torch.Tensor:
    """int32[272]: code of each exponent (LUT_ESCAPE = escape), then the 16-byte header codebook field."""
    key = ("cb", cb.exponents, str(device))
    t = _const_cache.get(key)
    if t is None:
        t = torch.tensor(cb.encode_lut() + list(cb.table16()), dtype=torch.int32).to(device)
        _const_cache[key] = t
    return t


def _exp2l_table(cb: Codebook, device: torch.device) -> torch.Tensor:
    """int32[288]: per exponent primary code | secondary code << 3 (| LUT_ESCAPE where EXP4 escapes it), then the
    16-byte primary table of the header and the first 16 ext bytes (secondary table, its size)."""
    key = ("2l", cb.exponents, str(device))
    t = _const_cache.get(key)
    if t is None:
        prim, sec = cb.primary, cb.secondary
        lut = []
        for e in range(256):
            if e in prim:
                v = prim.index(e)
            else:
                v = EXP2L_MARKER | ((sec.index(e) if e in sec else EXP2L_SEC_ESCAPE) << 3)
            lut.append(v | (LUT_ESCAPE if e not in cb.exponents[:MAX_CODES] else 0))
        fields = (bytes(prim) + bytes(16 - len(prim)) + bytes(sec) + bytes(EXP2L_MAX_SECONDARY - len(sec))
                  + bytes([len(sec)]))
        t = torch.tensor(lut + list(fields), dtype=torch.int32).to(device)
        _const_cache[key] = t
    return t


def _zero_flag(device: torch.device) -> torch.Tensor:
    """A device zero: the ``skip`` flag of the EXP4 passes when no EXP2L choice precedes them."""
    key = ("zero", str(device))
    t = _const_cache.get(key)
    if t is None:
        t = _const_cache[key] = torch.zeros(1, dtype=torch.int64, device=device)
    return t


class _Regions:
    """Kernel arguments describing a region list in units of ``view_dtype``."""

    def __init__(self, regions: Sequence[torch.Tensor], view_dtype: torch.dtype, device: torch.device):
        if any(not r.is_contiguous() for r in regions):
            raise ValueError("the triton backend needs contiguous regions (the codec API stages others)")
        views = [r.reshape(-1).view(view_dtype) for r in regions if r.numel() > 0]
        self.total = sum(v.numel() for v in views)
        self.multi = len(views) > 1
        if not views:
            self.base = torch.empty(0, dtype=view_dtype, device=device)
        else:
            self.base = views[0]
        if self.multi:
            starts = [0]
            for v in views:
                starts.append(starts[-1] + v.numel())
            host = torch.tensor([v.data_ptr() for v in views] + starts, dtype=torch.int64)
            if device.type == "cuda":
                table = host.pin_memory().to(device, non_blocking=True)
            else:
                table = host.to(device)
            self.ptrs = table[:len(views)]
            self.starts = table[len(views):]
            self.count = len(views)
        else:
            self.ptrs = self.starts = self.base
            self.count = 1
        # ALIGN > 1: every base 16-byte aligned and every start a multiple of 16 bytes (vectorisation hints)
        unit = 16 // views[0].element_size() if views else 1
        self.align = unit if self.multi and all(v.data_ptr() % 16 == 0 and v.numel() % unit == 0
                                                for v in views) else 1
        self._keep = views  # the views must outlive the launches that use their addresses

    def args(self):
        return self.base, self.ptrs, self.starts, self.count


def _device_ctx(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib
    return contextlib.nullcontext()


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _i64(tag: int) -> int:
    """A u64 transfer tag as the two's-complement int64 the kernels take."""
    return check_tag(tag) - (1 << 64) if tag >= 1 << 63 else check_tag(tag)


@register
class TritonBackend(CodecBackend):
    name = "triton"

    @classmethod
    def is_available(cls) -> bool:
        return _triton_importable()

    @classmethod
    def supports_device(cls, device: torch.device) -> bool:
        device = torch.device(device)
        if not _triton_importable():
            return False
        if device.type == "cuda":
            # (interpreted kernels would dereference device addresses of the region table on the host)
            return torch.cuda.is_available() and _mode() == "compiled"
        if device.type == "cpu":
            return os.environ.get("TRITON_INTERPRET") == "1" and _mode() == "interpreted"
        return False

    # ------------------------------------------------------------------------------------------ encode

    def encode_into(self, regions: Sequence[torch.Tensor], dtype: int, codebook: Codebook | None,
                    chunk_log2: int, out: torch.Tensor, tag: int = 0) -> None:
        tag = _i64(tag)
        esize = element_size(dtype)
        n = sum(r.numel() for r in regions)
        if out.dtype != torch.uint8 or not out.is_contiguous():
            raise ValueError("output buffer must be a contiguous uint8 tensor")
        out = out.reshape(-1)
        if out.numel() < encode_capacity(n, esize):
            raise ValueError(f"output buffer holds {out.numel()} bytes, encode needs at least "
                             f"{encode_capacity(n, esize)}")
        if any(r.element_size() != esize for r in regions):
            raise ValueError(f"regions do not hold elements of dtype code {dtype}")
        device = out.device
        if any(r.device != device for r in regions):
            raise ValueError("regions and output buffer must be on one device")
        K = _kernels()
        coded = codebook is not None and exp4_allowed(dtype) and n > 0
        with _device_ctx(device):
            # host-side shortcuts: a mode whose body cannot be shorter than RAW's even without escapes (and
            # secondary codes) cannot win; the rest of FORMAT.md §5 is decided on the device
            if coded and codebook.two_level and Exp2lLayout.compute(n, chunk_log2, 0, 0).body_bytes < n * esize:
                self._encode_two_level(K, regions, n, codebook, chunk_log2, out, tag)
            elif coded and Exp4Layout.compute(n, chunk_log2, 0).body_bytes < n * esize:
                self._encode_exp4(K, _Regions(regions, torch.int16, device), n, codebook.exp4(), chunk_log2, out, tag)
            else:
                self._encode_raw(K, regions, dtype, n, out, tag)

    def _encode_raw(self, K, regions, dtype, n, out, tag) -> None:
        device = out.device
        nb = n * element_size(dtype)
        if nb == 0:
            sums = torch.zeros(2, dtype=torch.int64, device=device)
        else:
            reg = _Regions(regions, torch.uint8, device)
            tiles = _cdiv(nb, _tiles()["raw"])
            ck = torch.empty(tiles, 2, dtype=torch.int64, device=device)
            K.raw_encode_kernel[(tiles,)](*reg.args(), nb, out, ck, MULTI=reg.multi, ALIGN=reg.align,
                                          TILE=_tiles()["raw"])
            sums = ck.sum(0)
        K.raw_header_kernel[(1,)](out, _crc_table(device), sums, dtype, n, nb, tag)

    def _encode_exp4(self, K, reg, n, codebook, chunk_log2, out, tag, skip=None) -> None:
        """EXP4 or RAW, decided on the device; nothing when ``skip`` (a device flag) is non-zero."""
        device = out.device
        skip = _zero_flag(device) if skip is None else skip
        tile = min(1 << chunk_log2, _tiles()["exp4"])
        n_tiles = _cdiv(n, tile)
        lay = Exp4Layout.compute(n, chunk_log2, 0)
        cbt = _codebook_table(codebook, device)
        cnt = torch.empty(n_tiles, dtype=torch.int32, device=device)
        ck = torch.empty(n_tiles, 2, dtype=torch.int64, device=device)
        K.exp4_encode_pass1[(n_tiles,)](*reg.args(), n, out, cbt, cnt, ck, lay.off_codes, skip,
                                        MULTI=reg.multi, ALIGN=reg.align, TILE=tile)
        incl = torch.cumsum(cnt, 0, dtype=torch.int64)
        sums = ck.sum(0)
        K.exp4_encode_pass2[(n_tiles,)](*reg.args(), n, out, cbt, _crc_table(device), cnt, incl, sums, n_tiles,
                                        lay.n_chunks, chunk_log2, codebook.n_codes, lay.off_codes,
                                        lay.off_counts, lay.off_pos, tag, skip, MULTI=reg.multi, ALIGN=reg.align,
                                        TILE=tile)

    def _encode_two_level(self, K, regions, n, codebook, chunk_log2, out, tag) -> None:
        """EXP2L, EXP4 or RAW (FORMAT.md §5), chosen on the device by exp2l_encode_plan into ``meta``."""
        K2 = _exp2l_kernels()
        device = out.device
        reg = _Regions(regions, torch.int16, device)
        tile = _tiles()["exp2l"]
        unit = min(tile, 1 << chunk_log2)
        n_tiles, n_units = _cdiv(n, tile), _cdiv(n, unit)
        lay = Exp2lLayout.compute(n, chunk_log2, 0, 0)   # offsets up to off_sec do not depend on the counts
        lut = _exp2l_table(codebook, device)
        cnt = torch.empty(n_units, 3, dtype=torch.int32, device=device)
        ck = torch.empty(n_tiles, 2, dtype=torch.int64, device=device)
        K2.exp2l_encode_count[(n_tiles,)](*reg.args(), n, lut, cnt, ck, MULTI=reg.multi, ALIGN=reg.align, TILE=tile,
                                          UNIT=unit)
        incl = torch.cumsum(cnt, 0, dtype=torch.int64)
        sums = ck.sum(0)
        chunks = torch.empty(lay.n_chunks, K2.ENC_SLOTS, dtype=torch.int64, device=device)
        meta = torch.empty(K2.META_SLOTS, dtype=torch.int64, device=device)
        K2.exp2l_encode_plan[(1,)](incl, chunks, meta, n, n_units, (1 << chunk_log2) // unit, lay.n_chunks,
                                   lay.off_sec, Exp4Layout.compute(n, chunk_log2, 0).off_pos, CB=PLAN_BLOCK)
        self._encode_exp4(K, reg, n, codebook.exp4(), chunk_log2, out, tag, skip=meta)
        scratch = torch.empty(n, dtype=torch.uint8, device=device)   # secondary codes by global marker index
        K2.exp2l_encode_write[(n_tiles,)](*reg.args(), n, out, lut, incl, meta, scratch, chunk_log2, lay.off_codes,
                                          MULTI=reg.multi, ALIGN=reg.align, TILE=tile, UNIT=unit)
        cpp = _tiles()["sec_chunks"]
        K2.exp2l_encode_finish[(_cdiv(lay.n_chunks, cpp),)](
            out, lut, _crc_table(device), chunks, meta, scratch, sums, n, lay.n_chunks, chunk_log2,
            len(codebook.primary), lay.off_codes, lay.off_scounts, lay.off_sec, tag, CPP=cpp, SB=_tiles()["sec"])

    # ------------------------------------------------------------------------------------------ decode

    def decode_into(self, payload: torch.Tensor, regions: Sequence[torch.Tensor], dtype: int,
                    tag: int = 0) -> None:
        check_tag(tag)
        if payload.dtype != torch.uint8:
            raise PayloadError(f"a payload is a uint8 buffer, got dtype {payload.dtype}")
        payload = payload.reshape(-1)
        if not payload.is_contiguous():
            payload = payload.contiguous()
        hdr = parse_header(payload[:HEADER_BYTES].cpu().numpy().tobytes(), payload.numel(), tag)
        n = sum(r.numel() for r in regions)
        check_destination(hdr, dtype, n)
        device = payload.device
        if any(r.device != device for r in regions):
            raise ValueError("payload and destination regions must be on one device")
        if n == 0:
            self._check_sums(hdr, 0, 0)
            return
        K = _kernels()
        with _device_ctx(device):
            if hdr.mode == MODE_RAW:
                self._decode_raw(K, hdr, payload, regions)
            elif hdr.mode == MODE_EXP2L:
                self._decode_exp2l(K, hdr, payload, regions)
            else:
                self._decode_exp4(K, hdr, payload, regions)

    @staticmethod
    def _check_sums(hdr, a: int, b: int) -> None:
        if (a, b) != (hdr.checksum_a, hdr.checksum_b):
            raise PayloadError.of(Status.CHECKSUM)

    def _decode_raw(self, K, hdr, payload, regions) -> None:
        device = payload.device
        reg = _Regions(regions, torch.uint8, device)
        nb = hdr.body_bytes
        tiles = _cdiv(nb, _tiles()["raw"])
        ck = torch.empty(tiles, 2, dtype=torch.int64, device=device)
        K.raw_decode_kernel[(tiles,)](payload, hdr.header_bytes, *reg.args(), nb, ck, MULTI=reg.multi,
                                      ALIGN=reg.align, TILE=_tiles()["raw"])
        a, b = (ck.sum(0) & 0xFFFFFFFF).tolist()
        self._check_sums(hdr, a, b)

    def _decode_exp4(self, K, hdr, payload, regions) -> None:
        device = payload.device
        n, cl, m = hdr.n_elems, hdr.chunk_log2, hdr.n_escapes
        lay = Exp4Layout.compute(n, cl, m)
        reg = _Regions(regions, torch.int16, device)
        hb = hdr.header_bytes
        body = payload[hb:hb + hdr.body_bytes]
        cb = body[lay.off_counts:lay.off_counts + 2 * lay.n_chunks].view(lay.n_chunks, 2).to(torch.int64)
        counts = cb[:, 0] | (cb[:, 1] << 8)
        incl = torch.cumsum(counts, 0)
        err = torch.empty(lay.n_chunks, dtype=torch.int32, device=device)
        K.exp4_validate_kernel[(lay.n_chunks,)](payload, hb, counts, incl, err, n, m, cl, lay.off_pos,
                                                EB=_tiles()["esc"])
        total = incl[-1:]
        errbits = ((err[:, None] >> torch.arange(3, device=device, dtype=torch.int32)) & 1).amax(0).to(torch.int64)
        ok = ((total == m) & (err.amax().view(1) == 0)).to(torch.int32)
        tile = min(1 << cl, _tiles()["exp4"])
        n_tiles = _cdiv(n, tile)
        ck = torch.empty(n_tiles + lay.n_chunks, 2, dtype=torch.int64, device=device)
        K.exp4_decode_dense[(n_tiles,)](payload, hb, *reg.args(), n, ok, ck, lay.off_codes, MULTI=reg.multi,
                                        ALIGN=reg.align, TILE=tile)
        K.exp4_decode_patch[(lay.n_chunks,)](payload, hb, *reg.args(), n, m, ok, counts, incl, ck[n_tiles:], cl,
                                             lay.off_codes, lay.off_pos, lay.off_exp, MULTI=reg.multi,
                                             ALIGN=reg.align, EB=_tiles()["esc"])
        sums = ck.sum(0) & 0xFFFFFFFF
        tot, e_count, e_pos, e_order, a, b = torch.cat([total, errbits, sums]).tolist()
        if tot != m:
            raise PayloadError.of(Status.ESC_SUM, aux=tot, n_escapes=m)
        for bad, status in ((e_count, Status.ESC_COUNT), (e_pos, Status.ESC_POS), (e_order, Status.ESC_ORDER)):
            if bad:
                raise PayloadError.of(status)
        self._check_sums(hdr, a, b)

    def _decode_exp2l(self, K, hdr, payload, regions) -> None:
        K2 = _exp2l_kernels()
        device = payload.device
        n, cl, m, sec_bytes = hdr.n_elems, hdr.chunk_log2, hdr.n_escapes, hdr.sec_bytes
        lay = Exp2lLayout.compute(n, cl, m, sec_bytes)
        nc, hb = lay.n_chunks, hdr.header_bytes
        reg = _Regions(regions, torch.int16, device)
        tile = _tiles()["exp2l"]
        unit = min(tile, 1 << cl)
        n_tiles, n_units = _cdiv(n, tile), _cdiv(n, unit)
        cnt = torch.empty(n_units, dtype=torch.int32, device=device)
        K2.exp2l_decode_count[(n_tiles,)](payload, hb, n, cnt, lay.off_codes, TILE=tile, UNIT=unit)
        incl = torch.cumsum(cnt, 0, dtype=torch.int64)
        chunks = torch.empty(nc, K2.DEC_SLOTS, dtype=torch.int64, device=device)
        ecounts = torch.empty(nc, dtype=torch.int64, device=device)
        eincl = torch.empty(nc, dtype=torch.int64, device=device)
        st = torch.empty(4, dtype=torch.int64, device=device)
        K2.exp2l_decode_plan[(1,)](payload, hb, incl, chunks, ecounts, eincl, st, n, n_units, (1 << cl) // unit, nc,
                                   cl, lay.off_scounts, lay.off_counts, CB=PLAN_BLOCK)
        err = torch.empty(nc, dtype=torch.int32, device=device)
        K.exp4_validate_kernel[(nc,)](payload, hb, ecounts, eincl, err, n, m, cl, lay.off_pos, EB=_tiles()["esc"])
        errbits = ((err[:, None] >> torch.arange(3, device=device, dtype=torch.int32)) & 1).amax(0).to(torch.int64)
        first_out = torch.where((err & 2) != 0, torch.arange(nc, device=device), nc).amin().view(1)
        ok = ((st[0] == 0) & (st[1] == sec_bytes) & (st[2] == m) & (st[3] == nc) & (err.amax() == 0))
        ok = ok.to(torch.int32).view(1)
        ck = torch.empty(n_tiles + nc, 2, dtype=torch.int64, device=device)
        K2.exp2l_decode_dense[(n_tiles,)](payload, hb, *reg.args(), n, ok, incl, chunks, ck, cl, lay.off_codes,
                                          lay.off_sec, MULTI=reg.multi, ALIGN=reg.align, TILE=tile, UNIT=unit)
        K2.exp2l_decode_patch[(nc,)](payload, hb, *reg.args(), n, m, ok, ecounts, eincl, ck[n_tiles:], cl,
                                     lay.off_pos, lay.off_exp, MULTI=reg.multi, ALIGN=reg.align, EB=_tiles()["esc"])
        sums = ck.sum(0) & 0xFFFFFFFF
        self._exp2l_verdict(hdr, nc, torch.cat([st, errbits, first_out, sums]).tolist())

    def _exp2l_verdict(self, hdr, nc: int, vals: list[int]) -> None:
        """Raise the first failed check in the reference decoder's order (FORMAT.md §6 step 4 for EXP2L, then 5):
        sec counts, escape counts, then chunk by chunk the marker count before the chunk's escape positions,
        escape order after all chunks, checksum."""
        too_many, need, total, first_mark, e_count, _, e_order, first_out, a, b = vals
        if too_many:
            raise PayloadError.of(Status.SEC_COUNT)
        if need != hdr.sec_bytes:
            raise PayloadError.of(Status.SEC_BYTES, aux=need, sec_bytes=hdr.sec_bytes)
        if total != hdr.n_escapes:
            raise PayloadError.of(Status.ESC_SUM, aux=total, n_escapes=hdr.n_escapes)
        if e_count:
            raise PayloadError.of(Status.ESC_COUNT)
        if first_mark < nc and first_mark <= first_out:
            raise PayloadError.of(Status.SEC_MARKERS, aux=first_mark)
        if first_out < nc:
            raise PayloadError.of(Status.ESC_POS)
        if e_order:
            raise PayloadError.of(Status.ESC_ORDER)
        self._check_sums(hdr, a, b)
