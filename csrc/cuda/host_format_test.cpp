// Host-side checks of the CUDA codec's shared logic (no GPU needed; scripts/check_cuda_compile.sh runs it):
//  1. format.h pack_header with the CRC table of the kernels == without it, on random headers of versions 1 and 2;
//  2. format.h validate_header with the CRC table == without it, and its verdicts are consistent, on valid and
//     corrupted headers of versions 1 and 2, expected transfer tags equal or not (the agreement with the Python
//     oracle format.py parse_header is tests/test_format_constants.py::test_validator_agrees_with_python);
//  3. encode8 / decode8 / checksum16 / checksum_delta (the per-group bit logic of the kernels, with the device
//     intrinsics emulated) against format.h's scalar definitions on all 65,536 bf16 patterns;
//  4. the layout facts the kernels' bounds rely on, for every n up to 70,000 and sampled larger n.
// Build: g++ -O2 -std=c++17 -I csrc/include -I csrc/cuda csrc/cuda/host_format_test.cpp
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "splitzip/format.h"
#include "splitzip_cuda_bits.cuh"
#include "splitzip_cuda_format.cuh"

using namespace splitzip;

static int g_fail = 0;
#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (!(cond)) {                                        \
      if (g_fail < 20) {                                  \
        std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
        std::fprintf(stderr, __VA_ARGS__);                \
        std::fprintf(stderr, "\n");                       \
      }                                                   \
      ++g_fail;                                           \
    }                                                     \
  } while (0)

// A mostly-plausible random header: version 2 (sometimes 1), random tag, fields mostly valid.
static Header random_header(std::mt19937_64& rng) {
  Header h;
  h.version = uint8_t(rng() % 4 == 0 ? kVersionV1 : kVersion);
  h.transfer_tag = h.version == kVersion ? (rng() % 3 == 0 ? 0 : rng()) : 0;
  if (h.version == kVersion && rng() % 32 == 0) h.ext[rng() % kExtBytes] = uint8_t(1 + rng() % 255);
  h.dtype = uint8_t(rng() % 7);
  h.mode = uint8_t(rng() % 3);
  const uint64_t esize = uint64_t(dtype_elem_size(h.dtype) ? dtype_elem_size(h.dtype) : 1);
  h.n_elems = (rng() % 8 == 0) ? (rng() >> (rng() % 64)) : rng() % 100000;
  if (h.mode == kModeExp4 || rng() % 4 == 0) {
    h.code_bits = rng() % 16 == 0 ? uint8_t(rng() % 9) : uint8_t(kCodeBits);
    h.n_codes = rng() % 16 == 0 ? uint8_t(rng() % 20) : uint8_t(1 + rng() % 16);
    h.chunk_log2 = rng() % 16 == 0 ? uint8_t(rng() % 20) : uint8_t(8 + rng() % 8);
    for (int i = 0; i < 16; ++i) h.codebook[i] = i < h.n_codes ? uint8_t(100 + i) : 0;
    if (rng() % 16 == 0) h.codebook[rng() % 16] = uint8_t(rng());
    h.n_escapes = h.n_elems ? rng() % (h.n_elems + 1) : 0;
    if (rng() % 16 == 0) h.n_escapes = h.n_elems + 1 + rng() % 5;
    if (h.chunk_log2 >= 8 && h.chunk_log2 <= 15 && h.n_elems < (uint64_t(1) << 40))
      h.body_bytes = Exp4Layout::compute(h.n_elems, h.chunk_log2, h.n_escapes).body_bytes;
    else
      h.body_bytes = rng();
  } else {
    h.body_bytes = h.n_elems * esize;
  }
  if (rng() % 16 == 0) h.body_bytes += 1 + rng() % 3;
  if (rng() % 32 == 0) h.reserved = uint16_t(1 + rng() % 100);
  h.checksum_a = uint32_t(rng());
  h.checksum_b = uint32_t(rng());
  return h;
}

// Corrupt the packed header `ref` (hb bytes) in one of a few ways; returns the payload length to validate with.
static uint64_t corrupt(std::mt19937_64& rng, uint8_t* ref, int hb, const Header& h) {
  const int kind = int(rng() % 8);
  auto reseal = [&]() {  // a CRC "fixed" after a version change covers the new version's header length
    const int nb = header_bytes_of(ref[4]) ? header_bytes_of(ref[4]) : kHeaderBytes;
    store_u32(ref + 12, header_crc(ref, nb));
  };
  if (kind == 1) ref[rng() % hb] ^= uint8_t(1u << (rng() % 8));  // bit flip (usually CRC)
  if (kind == 2) { ref[4] = rng() % 2 ? uint8_t(rng()) : uint8_t(3 - ref[4]); reseal(); }
  if (kind == 3) ref[rng() % 4] ^= 0x20;  // magic
  if (kind == 4) { ref[5 + rng() % 5] = uint8_t(rng()); reseal(); }
  uint64_t avail = uint64_t(hb) + h.body_bytes;
  if (kind == 5) avail = rng() % uint64_t(hb);
  if (kind == 6 && h.body_bytes > 0 && h.body_bytes < (uint64_t(1) << 62)) avail = hb + rng() % h.body_bytes;
  if (h.body_bytes > (uint64_t(1) << 62)) avail = ~uint64_t(0);
  return avail;
}

static void test_headers() {
  uint32_t tab[256];
  for (uint32_t i = 0; i < 256; ++i) tab[i] = crc32_table_entry(i);
  const char* s9 = "123456789";
  CHECK(crc32(reinterpret_cast<const uint8_t*>(s9), 9) == 0xCBF43926u, "format.h crc32 check value");
  std::mt19937_64 rng(12345);
  int counts[SZ_NUM_STATUS] = {0};
  for (int iter = 0; iter < 200000; ++iter) {
    const Header h = random_header(rng);
    uint64_t expected_tag = h.transfer_tag;
    if (rng() % 8 == 0) expected_tag = rng() % 2 ? rng() : 0;
    uint8_t ref[kHeaderBytes] = {0}, mine[kHeaderBytes] = {0};
    const int hb = pack_header(h, ref);
    CHECK(hb == header_bytes_of(h.version), "pack_header length");
    CHECK(pack_header(h, mine, tab) == hb && std::memcmp(ref, mine, size_t(hb)) == 0, "table CRC != bitwise CRC");
    const uint64_t avail = corrupt(rng, ref, hb, h);
    Header hv, hm;
    const int code = validate_header(ref, avail, expected_tag, &hv);
    const int code_tab = validate_header(ref, avail, expected_tag, &hm, tab);
    CHECK(code == code_tab, "validate_header with / without the CRC table: %d vs %d", code, code_tab);
    CHECK(code >= SZ_OK && (code <= SZ_ERR_TRUNCATED_BODY || is_exp2l_header_status(code)),
          "header status %d outside the header checks", code);
    if (code < 0 || code >= SZ_NUM_STATUS) continue;
    ++counts[code];
    if (code == SZ_OK) {
      CHECK(hv.transfer_tag == expected_tag, "valid header of another transfer");
      uint8_t pv[kHeaderBytes], pm[kHeaderBytes];  // compare field by field (the struct has padding)
      const int lv = pack_header(hv, pv);
      const int lm = pack_header(hm, pm);
      CHECK(lv == lm && std::memcmp(pv, pm, size_t(lv)) == 0 && hv.header_crc32 == hm.header_crc32,
            "parsed headers differ");
    }
    if (code == SZ_ERR_TRUNCATED_HEADER) CHECK(avail < uint64_t(kHeaderBytes), "trunc header");
    if (code == SZ_ERR_TRUNCATED_BODY) CHECK(avail >= uint64_t(kHeaderBytesV1), "trunc body");
  }
  const int n_tag = counts[SZ_ERR_TAG] + counts[SZ_ERR_TAG_V1];
  CHECK(counts[SZ_OK] > 1000 && 200000 - counts[SZ_OK] > 1000 && n_tag > 1000, "coverage: %d valid, %d tag",
        counts[SZ_OK], n_tag);
  for (int c = SZ_ERR_TRUNCATED_HEADER; c <= SZ_ERR_TRUNCATED_BODY; ++c) CHECK(counts[c] > 0, "status %d never seen", c);
  std::printf("headers: %d valid, %d invalid (%d of another transfer); table and bitwise CRC paths agree\n",
              counts[SZ_OK], 200000 - counts[SZ_OK], n_tag);
}

static void test_bits() {
  // codebooks: a typical one, one holding exponent 0, a full one, a single-entry one
  const std::vector<std::vector<int>> books = {
      {120, 121, 119, 122, 118, 123, 117, 116, 124, 115, 114, 125, 113, 112, 126, 111},
      {0, 127, 126, 125},
      {255, 254, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13},
      {127}};
  for (const auto& book : books) {
    uint8_t lut[256];
    for (int e = 0; e < 256; ++e) lut[e] = kLutEscape;
    for (size_t j = 0; j < book.size(); ++j) lut[book[j]] = uint8_t(j);
    uint8_t table[16] = {0};
    for (size_t j = 0; j < book.size(); ++j) table[j] = uint8_t(book[j]);
    for (uint32_t base = 0; base < 65536; base += 8) {
      uint16_t x[8];
      for (int k = 0; k < 8; ++k) x[k] = uint16_t((base + k * 4099u * (1 + (base >> 13))) & 0xFFFFu);
      if (base & 8) for (int k = 0; k < 8; ++k) x[k] = uint16_t(base + k);  // every pattern appears
      uint32_t w[4];
      for (int q = 0; q < 4; ++q) w[q] = uint32_t(x[2 * q]) | (uint32_t(x[2 * q + 1]) << 16);
      uint32_t sm_lo, sm_hi, codes, m8;
      cudabits::encode8(w, lut, sm_lo, sm_hi, codes, m8);
      uint8_t sm_bytes[8];
      for (int k = 0; k < 4; ++k) {
        sm_bytes[k] = uint8_t(sm_lo >> (8 * k));
        sm_bytes[4 + k] = uint8_t(sm_hi >> (8 * k));
      }
      for (int k = 0; k < 8; ++k) {
        const uint32_t e = exponent_of(x[k]);
        const bool esc = lut[e] == kLutEscape;
        const uint32_t want_code = esc ? 0u : lut[e];
        CHECK(sm_bytes[k] == sm_of(x[k]), "sm of %04x", x[k]);
        CHECK(((codes >> (4 * k)) & 0xFu) == want_code, "code of %04x", x[k]);
        CHECK(((m8 >> k) & 1u) == (esc ? 1u : 0u), "escape bit of %04x", x[k]);
      }
      // decode: non-escapes come back exactly; escapes come back with codebook[0] until patched
      uint32_t out[4];
      cudabits::decode8(sm_lo, sm_hi, codes, table, out);
      for (int k = 0; k < 8; ++k) {
        const uint32_t got = (out[k >> 1] >> (16 * (k & 1))) & 0xFFFFu;
        const uint32_t want = ((m8 >> k) & 1u) ? combine(sm_of(x[k]), table[0]) : x[k];
        CHECK(got == want, "decode8 of %04x gave %04x", x[k], got);
        if ((m8 >> k) & 1u) {  // patch + checksum delta == checksum of the patched data
          uint32_t ca = 0, cb = 0, ra = 0, rb = 0;
          const uint64_t i = 1000003ull * base + k;
          const uint32_t bd[2] = {got & 0xFFu, got >> 8}, bn[2] = {x[k] & 0xFFu, uint32_t(x[k]) >> 8};
          ca = bd[0] + bd[1];
          cb = uint32_t(2 * i + 1) * bd[0] + uint32_t(2 * i + 2) * bd[1];
          cudabits::checksum_delta(i, got, x[k], ca, cb);
          ra = bn[0] + bn[1];
          rb = uint32_t(2 * i + 1) * bn[0] + uint32_t(2 * i + 2) * bn[1];
          CHECK(ca == ra && cb == rb, "checksum_delta");
        }
      }
      // checksum16 vs byte loop at a large offset (exercises the mod 2^32 wrap)
      const uint64_t k0 = (uint64_t(base) * 2654435761ull) << 3;
      uint32_t ca = 7, cb = 11, ra = 7, rb = 11;
      cudabits::checksum16(w, uint32_t(k0), ca, cb);
      for (int b = 0; b < 16; ++b) {
        const uint32_t byte = (w[b >> 2] >> (8 * (b & 3))) & 0xFFu;
        ra += byte;
        rb += uint32_t(k0 + b + 1) * byte;
      }
      CHECK(ca == ra && cb == rb, "checksum16");
    }
  }
  std::printf("bits: encode8/decode8/checksum16/checksum_delta agree with format.h on all 65536 patterns\n");
}

static void check_layout(uint64_t n, int cl) {
  const Exp4Layout l0 = Exp4Layout::compute(n, cl, 0);
  const uint64_t cap = encode_capacity(n, 2);
  // encode kernel writes (relative to the buffer): sm [96, 96+align8(n)), codes up to off_codes + 4*ceil(n/8),
  // counts up to off_counts + 2*n_chunks -- all inside the buffer even when the payload ends up RAW
  CHECK(((n + 7) & ~uint64_t(7)) <= l0.off_codes, "sm tail n=%llu", (unsigned long long)n);
  CHECK(l0.off_codes + 4 * ((n + 7) / 8) <= l0.off_counts, "codes tail n=%llu", (unsigned long long)n);
  CHECK(kHeaderBytes + l0.off_counts + 2 * l0.n_chunks <= cap, "counts inside buffer n=%llu cl=%d", (unsigned long long)n, cl);
  // decode reads of the tail group (16 elements): sm [g, g+16) <= off_codes, codes [.., +8) <= off_counts
  CHECK(((n + 15) & ~uint64_t(15)) <= l0.off_codes, "dec sm tail n=%llu", (unsigned long long)n);
  CHECK(l0.off_codes + 8 * ((n + 15) / 16) <= l0.off_counts, "dec codes tail n=%llu", (unsigned long long)n);
  // escape staging: whenever EXP4 is still possible with ET escapes, positions end inside the buffer and
  // ET fits the staging array; the kernel's test equals "EXP4 body < raw"
  const uint64_t stage = cudafmt::exp4_escape_stage_cap(n, cl);
  uint64_t lo = 0, hi = n;  // largest ET with EXP4 possible, by bisection on the monotone predicate
  auto possible = [&](uint64_t et) { return align16(l0.off_pos + 2 * et) + et < 2 * n; };
  if (possible(0)) {
    while (lo < hi) {
      const uint64_t mid = (lo + hi + 1) / 2;
      if (possible(mid)) lo = mid; else hi = mid - 1;
    }
    const uint64_t et = lo;
    CHECK(et < stage, "stage cap n=%llu", (unsigned long long)n);
    CHECK(kHeaderBytes + l0.off_pos + 2 * et <= cap, "positions inside buffer");
    CHECK(Exp4Layout::compute(n, cl, et).body_bytes < 2 * n, "predicate == layout");
    CHECK(Exp4Layout::compute(n, cl, et + 1).body_bytes >= 2 * n, "predicate == layout (+1)");
  }
}

static void test_layout() {
  for (int cl = 8; cl <= 15; ++cl) {
    for (uint64_t n = 0; n <= 70000; ++n) check_layout(n, cl);
    std::mt19937_64 rng(cl);
    for (int i = 0; i < 2000; ++i) check_layout(rng() % (uint64_t(1) << (20 + rng() % 16)), cl);
  }
  std::printf("layout: bounds facts hold for all n <= 70000 and 16000 sampled n\n");
}

int main() {
  test_headers();
  test_bits();
  test_layout();
  if (g_fail) {
    std::fprintf(stderr, "%d checks FAILED\n", g_fail);
    return 1;
  }
  std::printf("host_format_test: all checks passed\n");
  return 0;
}
