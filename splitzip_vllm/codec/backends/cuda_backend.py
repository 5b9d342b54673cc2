"""CUDA codec backend (``splitzip_vllm._C_cuda``, built from ``csrc/cuda/splitzip_cuda.cu``).

Encode and decode run on the current torch CUDA stream and never synchronise with the host:

* ``encode_into`` writes header + body into ``out``; the payload length is in the device-side header
  (``96 + body_bytes``), so a caller that needs it on the host reads the 96 header bytes.
* Every entry point takes the transfer ``tag`` (u64, FORMAT.md §6a): encoders write it into the header, decoders
  refuse (on the device, before writing anything) a payload whose tag differs.
* ``decode_into_async`` validates the payload on the device and returns an ``int32[4]`` device status tensor
  (``[code, aux_lo, aux_hi, 0]``, code 0 = OK). Nothing is written outside the destination regions and nothing is
  read past the payload length, whatever the payload holds; on a non-zero code the destination holds garbage.
  ``raise_for_status`` (synchronises) turns a status (``format.Status``) into :class:`PayloadError` with the
  message the reference decoder would give (``format.decode_error_message``). ``decode_into`` is the synchronous convenience path (both steps).
* Encoders choose the mode on the device (FORMAT.md §5): EXP2L for a two-level codebook when it is strictly
  smaller than EXP4 and RAW, else EXP4, else RAW; the kernels of the modes that lose exit at once.
* ``encode_batch_into`` encodes all payloads of one request (one per layer) in ONE kernel launch, lengths
  written to a device tensor; with a two-level codebook (EXP2L possible) it encodes them one by one (one
  ``encode_into`` each), lengths still read on the device.
* Multi-region lists are refused inside CUDA-graph capture (their table comes from pinned host memory);
  caller tensors are recorded on the current stream (safe to free after a call on a side stream).
* ``encode_table_into`` / ``decode_table_into_async`` take a device table of region base addresses (int64 CUDA
  tensor) instead of a tensor list, for callers that keep block-pointer tables on the device (paged KV cache):
  every region holds ``region_elems`` elements, or ``prefix`` (int64 CUDA tensor, ``len(ptrs) + 1`` element
  offsets) gives their sizes. The tables are trusted.

Buffers must be 16-byte aligned for the kernels; misaligned ``out`` / ``payload`` tensors are staged through an
aligned temporary (device-to-device copy, still asynchronous).

Importing this module never fails because the extension is missing: ``is_available()`` is then False.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..codebook import Codebook
from ..format import (HEADER_BYTES, PayloadError, Status, check_tag, decode_error_message, element_size,
                      encode_capacity, dtype_code)
from . import BackendUnavailableError, CodecBackend, register

try:
    from ... import _C_cuda  # type: ignore[attr-defined]
    _IMPORT_ERROR: Exception | None = None
except ImportError as e:  # extension not built (CPU-only torch, or built without CUDA)
    _C_cuda = None
    _IMPORT_ERROR = e

_ALIGN = 16
_OFF_BODY_BYTES = 48                      # header field body_bytes (u64, FORMAT.md §1)
DTYPE_BF16 = dtype_code(torch.bfloat16)   # the only dtype with coded modes


def refuse_host_table_in_capture(regions: Sequence[torch.Tensor], what: str) -> None:
    """More than one non-empty region needs a region table copied from pinned host memory: unsafe to capture
    into a CUDA graph (the replay would read a host buffer that is gone), so refused with a clear error."""
    if sum(1 for r in regions if r.numel() > 0) > 1 and torch.cuda.is_current_stream_capturing():
        raise ValueError(f"splitzip cuda {what}: a list of regions needs a region table copied from pinned host "
                         "memory, which CUDA-graph capture cannot replay safely; inside a graph pass a device "
                         "table (encode_table_into / decode_table_into_async) or one contiguous region")


def _codebook_args(codebook: Codebook | None) -> tuple[list[int] | None, bool]:
    """The extension's codebook arguments: all exponents (EXP4 takes the first 16) and whether EXP2L may be used."""
    if codebook is None:
        return None, False
    return list(codebook.exponents), codebook.two_level


def _status_values(status: torch.Tensor) -> tuple[int, int]:
    s = [int(v) & 0xFFFFFFFF for v in status.reshape(-1)[:4].cpu().tolist()]
    return s[0], s[1] | (s[2] << 32)


def _aligned(t: torch.Tensor) -> bool:
    return t.numel() == 0 or t.data_ptr() % _ALIGN == 0


def _cuda_regions(regions: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    out = []
    for r in regions:
        if r.device != device:
            raise ValueError(f"the cuda codec backend needs all tensors on {device}, got one on {r.device}")
        out.append(r if r.is_contiguous() else r.contiguous())
    return out


def _flat_payload(payload: torch.Tensor, device: torch.device) -> torch.Tensor:
    if payload.dtype != torch.uint8:
        raise PayloadError(f"a payload is a uint8 buffer, got dtype {payload.dtype}")
    if payload.device != device:
        raise ValueError(f"payload is on {payload.device}, the destination on {device}")
    flat = payload.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if not _aligned(flat):
        staged = torch.empty_like(flat)  # fresh allocations are aligned
        staged.copy_(flat)
        flat = staged
    return flat


@register
class CudaBackend(CodecBackend):
    name = "cuda"
    two_level = True   # EXP2L kernels: csrc/cuda/splitzip_cuda_exp2l_{enc,dec}.cuh

    @classmethod
    def is_available(cls) -> bool:
        return _C_cuda is not None and torch.cuda.is_available()

    @classmethod
    def supports_device(cls, device: torch.device) -> bool:
        return torch.device(device).type == "cuda"

    @staticmethod
    def _ext():
        if _C_cuda is None:
            raise BackendUnavailableError(f"splitzip_vllm._C_cuda is not built: {_IMPORT_ERROR}")
        return _C_cuda

    # ---- encode ---------------------------------------------------------------------------------------------
    def encode_into(self, regions: Sequence[torch.Tensor], dtype: int, codebook: Codebook | None,
                    chunk_log2: int, out: torch.Tensor, tag: int = 0) -> None:
        ext = self._ext()
        check_tag(tag)
        if out.dtype != torch.uint8 or out.device.type != "cuda" or not out.is_contiguous():
            raise ValueError("the cuda codec backend encodes into a contiguous uint8 CUDA tensor")
        regs = _cuda_regions(regions, out.device)
        refuse_host_table_in_capture(regs, "encode")
        cb, two = _codebook_args(codebook)
        flat = out.reshape(-1)
        if _aligned(flat):
            ext.encode(regs, dtype, cb, chunk_log2, flat, tag, two)
            return
        n = sum(r.numel() for r in regs)
        cap = encode_capacity(n, element_size(dtype))
        if flat.numel() < cap:
            raise ValueError(f"output buffer holds {flat.numel()} bytes, encode needs {cap}")
        tmp = torch.empty(cap, dtype=torch.uint8, device=out.device)
        ext.encode(regs, dtype, cb, chunk_log2, tmp, tag, two)
        flat[:cap].copy_(tmp)

    def encode_table_into(self, ptrs: torch.Tensor, prefix: torch.Tensor | None, region_elems: int, n_elems: int,
                          dtype: int, codebook: Codebook | None, chunk_log2: int, out: torch.Tensor,
                          tag: int = 0) -> None:
        """``encode_into`` over a device table of region base addresses (see the module docstring)."""
        ext = self._ext()
        check_tag(tag)
        if out.dtype != torch.uint8 or out.device.type != "cuda" or not out.is_contiguous() or not _aligned(out):
            raise ValueError("encode_table_into needs a contiguous, 16-byte aligned uint8 CUDA output tensor")
        cb, two = _codebook_args(codebook)
        ext.encode_ptrs(ptrs, prefix, region_elems, n_elems, dtype, cb, chunk_log2, out.reshape(-1), tag, two)

    def encode_batch_into(self, items: Sequence[Sequence[torch.Tensor]], dtype: int, codebook: Codebook | None,
                          chunk_log2: int, outs: Sequence[torch.Tensor],
                          tags: Sequence[int] | None = None) -> torch.Tensor:
        """Encode every item (e.g. each layer of one request: a list of regions) into its ``outs`` buffer in ONE
        kernel launch on the current stream; payload ``i`` is bound to ``tags[i]`` (default 0) and is byte-identical
        to ``encode_into``'s. Returns the device int64 tensor of payload lengths (no host synchronisation). The
        item table is copied from pinned memory: not inside CUDA-graph capture. A two-level codebook on bfloat16
        data may give EXP2L payloads, which the one-launch kernel does not write: those items are encoded one by
        one (``encode_into``), their lengths gathered from the device headers."""
        ext = self._ext()
        tags = [0] * len(items) if tags is None else [check_tag(t) for t in tags]
        if not items or len(outs) != len(items) or len(tags) != len(items):
            raise ValueError("encode_batch_into needs at least one item, and one output buffer and tag per item")
        if torch.cuda.is_current_stream_capturing():
            raise ValueError("splitzip cuda encode_batch_into copies its item table from pinned host memory: not "
                             "inside CUDA-graph capture")
        dev = outs[0].device
        for o in outs:
            if o.dtype != torch.uint8 or o.device != dev or not o.is_contiguous() or not _aligned(o):
                raise ValueError("encode_batch_into needs contiguous, 16-byte aligned uint8 output tensors on one "
                                 "CUDA device")
        regs = [_cuda_regions(r, dev) for r in items]
        cb, two = _codebook_args(codebook)
        if two and dtype == DTYPE_BF16:
            for r, o, t in zip(regs, outs, tags):
                self.encode_into(r, dtype, codebook, chunk_log2, o, t)
            raw = torch.stack([o.reshape(-1)[_OFF_BODY_BYTES:_OFF_BODY_BYTES + 8] for o in outs]).to(torch.int64)
            shifts = torch.arange(0, 64, 8, dtype=torch.int64, device=dev)
            return (raw << shifts).sum(1) + HEADER_BYTES  # little-endian u64 body_bytes, on the device
        return ext.encode_batch(regs, dtype, cb, chunk_log2, [o.reshape(-1) for o in outs], tags)

    # ---- decode ---------------------------------------------------------------------------------------------
    def decode_into(self, payload: torch.Tensor, regions: Sequence[torch.Tensor], dtype: int,
                    tag: int = 0) -> None:
        """Decode and wait for the verdict: raises :class:`PayloadError` (synchronises the stream)."""
        if not regions:
            raise ValueError("no destination regions given")
        status = self.decode_into_async(payload, regions, dtype, tag=tag)
        self.raise_for_status(status, payload, dtype, sum(r.numel() for r in regions), tag)

    def decode_into_async(self, payload: torch.Tensor, regions: Sequence[torch.Tensor], dtype: int,
                          status: torch.Tensor | None = None, tag: int = 0) -> torch.Tensor:
        """Enqueue the decode on the current stream; returns the device status tensor (int32[4], 0 = OK).

        No host synchronisation (CUDA-graph and side-stream safe; more than one region is refused inside a graph
        capture: use ``decode_table_into_async`` with a device table there). ``status``
        may be a preallocated int32 CUDA tensor of >= 4 entries. Check it later with ``raise_for_status`` or
        read ``status[0]`` on the device.
        """
        ext = self._ext()
        check_tag(tag)
        if not regions:
            raise ValueError("no destination regions given")
        dev = regions[0].device
        if dev.type != "cuda":
            raise ValueError(f"the cuda codec backend decodes into CUDA tensors, got {dev}")
        regs = _cuda_regions(regions, dev)
        refuse_host_table_in_capture(regs, "decode")
        for r in regions:
            if not r.is_contiguous():
                raise ValueError("decode destinations must be contiguous (the api stages non-contiguous ones)")
        flat = _flat_payload(payload, dev)
        return ext.decode(flat, flat.numel(), regs, dtype, status, tag)

    def decode_table_into_async(self, payload: torch.Tensor, ptrs: torch.Tensor, prefix: torch.Tensor | None,
                                region_elems: int, n_elems: int, dtype: int,
                                status: torch.Tensor | None = None, tag: int = 0) -> torch.Tensor:
        """``decode_into_async`` into a device table of region base addresses (see the module docstring)."""
        ext = self._ext()
        check_tag(tag)
        flat = _flat_payload(payload, ptrs.device)
        return ext.decode_ptrs(flat, flat.numel(), ptrs, prefix, region_elems, n_elems, dtype, status, tag)

    @staticmethod
    def raise_for_status(status: torch.Tensor, payload: torch.Tensor, dtype: int, n_elems: int,
                         tag: int = 0) -> None:
        """Synchronise on ``status`` and raise :class:`PayloadError` when the decode failed (``tag``: the
        transfer tag the decode expected)."""
        code, aux = _status_values(status)
        if code == Status.OK:
            return
        flat = payload.reshape(-1)
        header = flat[:HEADER_BYTES].cpu().numpy().tobytes()
        raise PayloadError(decode_error_message(code, aux, header, flat.numel(), dtype, n_elems, tag), code)
