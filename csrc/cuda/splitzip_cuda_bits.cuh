// Per-group bit logic of the CUDA kernels (8 bf16 elements = four 32-bit words), host- and device-compilable
// so that csrc/cuda/host_format_test.cpp can check it exhaustively against format.h's scalar definitions.
// On the device __byte_perm / __dp4a do the work; on the host the same functions are emulated.
#pragma once

#include <cstdint>

#include "splitzip/format.h"

#if defined(__CUDACC__)
#define SZ_UNROLL _Pragma("unroll")
#else
#define SZ_UNROLL
#endif

namespace splitzip {
namespace cudabits {

// __byte_perm(x, y, s) for selectors whose nibbles are 0..7 (no sign replication).
SZ_HD uint32_t prmt(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, s);
#else
  const uint64_t v = (uint64_t(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= uint32_t((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
  return r;
#endif
}

// __dp4a(a, b, c) unsigned: c + sum_i a.byte_i * b.byte_i
SZ_HD uint32_t dp4a(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  return __dp4a(a, b, c);
#else
  for (int i = 0; i < 4; ++i) c += ((a >> (8 * i)) & 0xFFu) * ((b >> (8 * i)) & 0xFFu);
  return c;
#endif
}

// Checksum terms (FORMAT.md §4) of 16 data bytes w[0..3] (little-endian) whose first byte is byte k0.
SZ_HD void checksum16(const uint32_t w[4], uint32_t k0, uint32_t& ca, uint32_t& cb) {
  uint32_t s = dp4a(w[0], 0x01010101u, 0u);
  s = dp4a(w[1], 0x01010101u, s);
  s = dp4a(w[2], 0x01010101u, s);
  s = dp4a(w[3], 0x01010101u, s);
  uint32_t j = dp4a(w[0], 0x03020100u, 0u);
  j = dp4a(w[1], 0x07060504u, j);
  j = dp4a(w[2], 0x0B0A0908u, j);
  j = dp4a(w[3], 0x0F0E0D0Cu, j);
  ca += s;
  cb += (k0 + 1u) * s + j;  // sum_j (k0 + j + 1) * b_j mod 2^32
}

// Encode 8 elements (w[q] = element 2q | element 2q+1 << 16): sm bytes (sm_lo = elements 0..3), packed codes
// (even element in the low nibble, escapes coded 0), escape bits (bit k = element k).
SZ_HD void encode8(const uint32_t w[4], const uint8_t* lut, uint32_t& sm_lo, uint32_t& sm_hi, uint32_t& codes,
                   uint32_t& m8) {
  uint32_t smp[4], l[8];
  SZ_UNROLL for (int q = 0; q < 4; ++q) {
    smp[q] = (w[q] & 0x007F007Fu) | ((w[q] >> 8) & 0x00800080u);  // sm of 2q at byte 0, of 2q+1 at byte 2
    l[2 * q] = lut[(w[q] >> 7) & 0xFFu];
    l[2 * q + 1] = lut[(w[q] >> 23) & 0xFFu];
  }
  sm_lo = prmt(smp[0], smp[1], 0x6420);
  sm_hi = prmt(smp[2], smp[3], 0x6420);
  const uint32_t v0 = l[0] | (l[1] << 8) | (l[2] << 16) | (l[3] << 24);
  const uint32_t v1 = l[4] | (l[5] << 8) | (l[6] << 16) | (l[7] << 24);
  const uint32_t t0 = v0 & 0x0F0F0F0Fu, t1 = v1 & 0x0F0F0F0Fu;
  codes = prmt(t0 | (t0 >> 4), t1 | (t1 >> 4), 0x6420);
  static_assert(kLutEscape == 0x80, "escape bit = bit 7 of a lut byte");
  const uint32_t e0 = (v0 >> 7) & 0x01010101u, e1 = (v1 >> 7) & 0x01010101u;
  m8 = ((e0 | (e0 >> 7) | (e0 >> 14) | (e0 >> 21)) & 0xFu) |
       (((e1 | (e1 >> 7) | (e1 >> 14) | (e1 >> 21)) & 0xFu) << 4);
}

// Decode 8 elements from 8 sm bytes (s0 = elements 0..3) and 8 code nibbles through a 16-entry table.
SZ_HD void decode8(uint32_t s0, uint32_t s1, uint32_t cw, const uint8_t* table, uint32_t w[4]) {
  uint32_t e[8];
  SZ_UNROLL for (int k = 0; k < 8; ++k) e[k] = table[(cw >> (4 * k)) & 0xFu];
  const uint32_t smp[4] = {prmt(s0, 0u, 0x4140), prmt(s0, 0u, 0x4342), prmt(s1, 0u, 0x4140),
                           prmt(s1, 0u, 0x4342)};
  SZ_UNROLL for (int q = 0; q < 4; ++q)
    w[q] = ((smp[q] & 0x00800080u) << 8) | ((e[2 * q] | (e[2 * q + 1] << 16)) << 7) | (smp[q] & 0x007F007Fu);
}

// Byte sum of one bf16 element (its contribution to checksum A).
SZ_HD uint32_t elem_bytesum(uint32_t x) { return (x & 0xFFu) + ((x >> 8) & 0xFFu); }

// Change of (A, B) when element i changes from bits xd to bits xn.
SZ_HD void checksum_delta(uint64_t i, uint32_t xd, uint32_t xn, uint32_t& ca, uint32_t& cb) {
  const uint32_t ds = elem_bytesum(xn) - elem_bytesum(xd);
  ca += ds;
  cb += (uint32_t(i) * 2u + 1u) * ds + (((xn >> 8) & 0xFFu) - ((xd >> 8) & 0xFFu));
}

}  // namespace cudabits
}  // namespace splitzip
