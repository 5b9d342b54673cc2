// Header construction and validation for the CUDA codec, usable on host (g++) and device (nvcc).
//
// format.h computes the header CRC bitwise (512 dependent steps), which costs microseconds on one GPU thread;
// here the CRC runs over a 256-entry table that the caller provides (a kernel fills it in shared memory with
// one thread per entry). validate_header_code() mirrors splitzip/validate.h check by check and returns an
// SzStatus code instead of a message. tests: csrc/cuda/host_format_test.cpp compares both against format.h /
// validate.h on random and corrupted headers.
#pragma once

#include <cstdint>

#include "splitzip/format.h"
#include "splitzip_cuda.h"

namespace splitzip {
namespace cudafmt {

// Entry i of the reflected CRC-32 table (polynomial 0xEDB88320), as zlib.
SZ_HD uint32_t crc32_table_entry(uint32_t i) {
  uint32_t c = i;
  for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  return c;
}

// CRC-32 of the `header_bytes` header bytes (64 or 96) with the CRC field (bytes 12..15) taken as zero.
SZ_HD uint32_t header_crc_table(const uint32_t* tab, const uint8_t* hdr, int header_bytes) {
  uint32_t c = 0xFFFFFFFFu;
  for (int i = 0; i < header_bytes; ++i) {
    const uint32_t b = (i >= kOffHeaderCrc && i < kOffHeaderCrc + 4) ? 0u : uint32_t(hdr[i]);
    c = tab[(c ^ b) & 0xFFu] ^ (c >> 8);
  }
  return ~c;
}

// The 96 wire bytes of a version-2 header (same bytes as format.h pack_header; CRC via the table).
SZ_HD void build_header(uint8_t* out, const uint32_t* tab, int dtype, int mode, int code_bits, int n_codes,
                        int chunk_log2, const uint8_t* codebook16, uint64_t n_elems, uint64_t n_escapes,
                        uint64_t body_bytes, uint32_t checksum_a, uint32_t checksum_b, uint64_t tag) {
  store_u32(out + kOffMagic, kMagicU32);
  out[kOffVersion] = uint8_t(kVersion);
  out[kOffDtype] = uint8_t(dtype);
  out[kOffMode] = uint8_t(mode);
  out[kOffCodeBits] = uint8_t(code_bits);
  out[kOffNCodes] = uint8_t(n_codes);
  out[kOffChunkLog2] = uint8_t(chunk_log2);
  store_u16(out + kOffReserved, 0);
  store_u32(out + kOffHeaderCrc, 0u);
  for (int i = 0; i < 16; ++i) out[kOffCodebook + i] = codebook16 ? codebook16[i] : uint8_t(0);
  store_u64(out + kOffNElems, n_elems);
  store_u64(out + kOffNEscapes, n_escapes);
  store_u64(out + kOffBodyBytes, body_bytes);
  store_u32(out + kOffChecksumA, checksum_a);
  store_u32(out + kOffChecksumB, checksum_b);
  store_u64(out + kOffTransferTag, tag);
  for (int i = 0; i < kExtBytes; ++i) out[kOffExt + i] = 0;
  store_u32(out + kOffHeaderCrc, header_crc_table(tab, out, kHeaderBytes));
}

using u128 = unsigned __int128;

SZ_HD u128 align16_wide(u128 x) { return (x + 15) & ~u128(15); }

// FORMAT.md §3 body length without 64-bit overflow (validate.h detail::exp4_body_bytes_wide).
SZ_HD u128 exp4_body_bytes_wide(uint64_t n, int chunk_log2, uint64_t m) {
  const u128 c = u128(1) << chunk_log2;
  const u128 n_chunks = (u128(n) + c - 1) >> chunk_log2;
  const u128 off_codes = align16_wide(n);
  const u128 off_counts = align16_wide(off_codes + (u128(n) + 1) / 2);
  const u128 off_pos = align16_wide(off_counts + 2 * n_chunks);
  const u128 off_exp = align16_wide(off_pos + 2 * u128(m));
  return off_exp + m;
}

// FORMAT.md §6 steps 1-3 for the header alone (versions 1 and 2, transfer tag included), in the order of
// splitzip/validate.h. `hdr` must hold min(available, 96) readable bytes (nothing is read past them). Returns
// SZ_OK and fills *out, or the code.
SZ_HD int validate_header_code(const uint8_t* hdr, uint64_t available, uint64_t expected_tag, const uint32_t* tab,
                               Header* out) {
  if (available < uint64_t(kHeaderBytesV1)) return SZ_ERR_TRUNCATED_HEADER;
  Header h;
  if (load_u32(hdr + kOffMagic) != kMagicU32) return SZ_ERR_MAGIC;
  const int hb = header_bytes_of(hdr[kOffVersion]);
  if (hb == 0) return SZ_ERR_VERSION;
  if (available < uint64_t(hb)) return SZ_ERR_TRUNCATED_HEADER;
  (void)parse_header(hdr, &h);  // format.h, device-safe; reads hb bytes
  if (header_crc_table(tab, hdr, hb) != h.header_crc32) return SZ_ERR_HEADER_CRC;
  if (!dtype_known(h.dtype)) return SZ_ERR_DTYPE;
  if (h.reserved != 0) return SZ_ERR_RESERVED;
  const uint64_t esize = uint64_t(dtype_elem_size(h.dtype));
  // sizes compared in 128-bit arithmetic (untrusted fields near 2^64), as validate.h; once the header passes,
  // body_bytes <= available - header bytes bounds every 64-bit size computed from it
  if (h.mode == kModeRaw) {
    bool cb_set = false;
    for (int i = 0; i < 16; ++i) cb_set |= h.codebook[i] != 0;
    if (h.code_bits || h.n_codes || h.chunk_log2 || h.n_escapes || cb_set) return SZ_ERR_RAW_FIELDS;
    if (u128(h.body_bytes) != u128(h.n_elems) * esize) return SZ_ERR_RAW_BODY;
  } else if (h.mode == kModeExp4) {
    if (!dtype_exp4_allowed(h.dtype)) return SZ_ERR_EXP4_DTYPE;
    if (h.code_bits != kCodeBits) return SZ_ERR_CODE_BITS;
    if (h.n_codes < 1 || h.n_codes > kMaxCodes) return SZ_ERR_N_CODES;
    if (h.chunk_log2 < kMinChunkLog2 || h.chunk_log2 > kMaxChunkLog2) return SZ_ERR_CHUNK_LOG2;
    if (h.n_escapes > h.n_elems) return SZ_ERR_ESCAPES_GT_N;
    bool bad = false;
    for (int i = 0; i < 16; ++i) {
      if (i < h.n_codes) {
        for (int j = 0; j < i; ++j) bad |= h.codebook[j] == h.codebook[i];
      } else {
        bad |= h.codebook[i] != 0;
      }
    }
    if (bad) return SZ_ERR_CODEBOOK;
    if (u128(h.body_bytes) != exp4_body_bytes_wide(h.n_elems, h.chunk_log2, h.n_escapes)) return SZ_ERR_EXP4_BODY;
  } else {
    return SZ_ERR_MODE;
  }
  bool ext_set = false;
  for (int i = 0; i < kExtBytes; ++i) ext_set |= h.ext[i] != 0;
  if (ext_set) return SZ_ERR_EXT;
  if (h.transfer_tag != expected_tag) return h.version == kVersionV1 ? SZ_ERR_TAG_V1 : SZ_ERR_TAG;
  if (available - uint64_t(hb) < h.body_bytes) return SZ_ERR_TRUNCATED_BODY;
  if (out) *out = h;
  return SZ_OK;
}

// EXP4 tile lengths of the CUDA kernels (elements): whole chunks, at least 8192 (encode) / 16384 (decode), so
// that the fixed latency of a tile (tile id, look-back, escape phase) is amortised over enough bytes.
SZ_HD uint64_t exp4_encode_tile_elems(int chunk_log2) {
  return chunk_log2 >= 13 ? (uint64_t(1) << chunk_log2) : uint64_t(8192);
}
SZ_HD uint64_t exp4_decode_tile_elems(int chunk_log2) {
  return chunk_log2 >= 14 ? (uint64_t(1) << chunk_log2) : uint64_t(16384);
}

// Upper bound on the escapes an encoder can ever need to stage: beyond it EXP4 cannot be smaller than RAW.
// EXP4 needs align16(off_pos + 2M) + M < 2n, hence M < (2n - off_pos) / 3.
SZ_HD uint64_t exp4_escape_stage_cap(uint64_t n, int chunk_log2) {
  const uint64_t off_pos = Exp4Layout::compute(n, chunk_log2, 0).off_pos;
  return 2 * n > off_pos ? (2 * n - off_pos) / 3 + 1 : 0;
}

}  // namespace cudafmt
}  // namespace splitzip
