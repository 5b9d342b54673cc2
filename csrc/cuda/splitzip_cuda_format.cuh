// Tile geometry of the CUDA kernels, usable on host (g++, host_format_test) and device (nvcc). The header is
// written and validated by format.h (pack_header / validate_header, with a shared-memory CRC table on the device).
#pragma once

#include <cstdint>

#include "splitzip/format.h"

namespace splitzip {
namespace cudafmt {

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

// EXP2L (FORMAT.md §3a) uses the EXP4 tile lengths. It is worth trying only if its smallest body (no secondary
// codes, no escapes) is below RAW's, and it can only win with M escapes where align16(off_pos + 2M) + M < 2n, so
// an encoder never stages more than this many (off_pos of the smallest layout: off_pos only grows with sec_bytes).
SZ_HD bool exp2l_can_beat_raw(uint64_t n, int chunk_log2) {
  return Exp2lLayout::compute(n, chunk_log2, 0, 0).body_bytes < 2 * n;
}
SZ_HD uint64_t exp2l_escape_stage_cap(uint64_t n, int chunk_log2) {
  const uint64_t off_pos = Exp2lLayout::compute(n, chunk_log2, 0, 0).off_pos;
  return 2 * n > off_pos ? (2 * n - off_pos) / 3 + 1 : 0;
}

}  // namespace cudafmt
}  // namespace splitzip
