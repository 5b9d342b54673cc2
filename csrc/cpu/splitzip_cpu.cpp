// SplitZip-KV CPU codec: FORMAT.md v2 payloads (v1 decoded too), byte-identical to splitzip_vllm/codec/reference.py.
//
// One pass over the data per direction. The data is cut into chunks of 2^chunk_log2 elements; each chunk is
// processed from/into the caller's region directly when it lies inside one region, otherwise through a small
// staging buffer (chunks that straddle region boundaries). Kernels: an AVX-512 (BW + VBMI + VNNI) one chosen
// at run time, and a portable scalar one that writes the same bytes. The content checksum (FORMAT.md §4) is
// accumulated in the same pass: lane-wise byte sums with VNNI dot products.
#include "splitzip_cpu.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "splitzip/format.h"

#if defined(__x86_64__) || defined(_M_X64)
#define SZ_X86 1
#include <immintrin.h>
#else
#define SZ_X86 0
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "splitzip CPU codec assumes a little-endian host"
#endif

namespace splitzip {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Scalar kernels (reference semantics, also used for tails)
// ---------------------------------------------------------------------------------------------------------------

// The scalar kernels avoid multiplies in the checksum: over a range of m items with sums s_j (j = 0..m-1),
// sum_j j s_j = m * S - T where S = sum_j s_j and T = sum_j (S after item j).

// Checksum of bytes p[from..to) with local weights (k + 1); accumulates into a, b.
inline void checksum_scalar(const uint8_t* p, uint64_t from, uint64_t to, uint32_t& a, uint32_t& b) {
  uint32_t S = 0, T = 0;
  for (uint64_t k = from; k < to; ++k) {
    S += p[k];
    T += S;
  }
  const uint32_t m = uint32_t(to - from);
  a += S;
  b += uint32_t(from + 1) * S + (m * S - T);
}

// Encode elements [from, len) of one chunk (`from` even). Returns the new escape count.
inline uint32_t encode_range_scalar(const uint8_t* src, uint32_t from, uint32_t len, uint8_t* sm_out,
                                    uint8_t* codes_out, const uint8_t* lut, uint16_t* esc_pos, uint8_t* esc_exp,
                                    uint32_t cnt, uint32_t& a, uint32_t& b) {
  // element sums s_i = lo_i + hi_i; sum (2i+1) lo + (2i+2) hi = 2 sum i s_i + S + H with H = sum hi_i
  uint32_t S = 0, T = 0, H = 0;
  uint32_t i = from;
  for (; i + 2 <= len; i += 2) {
    uint32_t w;
    std::memcpy(&w, src + 2 * size_t(i), 4);
    const uint16_t x0 = uint16_t(w), x1 = uint16_t(w >> 16);
    S += (x0 & 0xFFu) + (x0 >> 8);
    T += S;
    S += (x1 & 0xFFu) + (x1 >> 8);
    T += S;
    H += (x0 >> 8) + (x1 >> 8);
    const uint32_t e0 = exponent_of(x0), e1 = exponent_of(x1);
    sm_out[i] = uint8_t(sm_of(x0));
    sm_out[i + 1] = uint8_t(sm_of(x1));
    const uint32_t c0 = lut[e0], c1 = lut[e1];
    codes_out[i >> 1] = uint8_t((c0 & 0x0F) | ((c1 & 0x0F) << 4));  // escapes (0x80) code as 0
    if ((c0 | c1) & kLutEscape) {
      if (c0 & kLutEscape) {
        esc_pos[cnt] = uint16_t(i);
        esc_exp[cnt++] = uint8_t(e0);
      }
      if (c1 & kLutEscape) {
        esc_pos[cnt] = uint16_t(i + 1);
        esc_exp[cnt++] = uint8_t(e1);
      }
    }
  }
  if (i < len) {  // odd length: the last high nibble is 0
    const uint16_t x0 = uint16_t(src[2 * size_t(i)] | (src[2 * size_t(i) + 1] << 8));
    S += (x0 & 0xFFu) + (x0 >> 8);
    T += S;
    H += x0 >> 8;
    const uint32_t e0 = exponent_of(x0);
    sm_out[i] = uint8_t(sm_of(x0));
    const uint32_t c0 = lut[e0];
    codes_out[i >> 1] = uint8_t(c0 & 0x0F);
    if (c0 & kLutEscape) {
      esc_pos[cnt] = uint16_t(i);
      esc_exp[cnt++] = uint8_t(e0);
    }
  }
  const uint32_t m = len - from;
  a += S;
  b += 2u * (from * S + (m * S - T)) + S + H;
  return cnt;
}

// Decode elements [from, len) of one chunk (`from` even; dense part, escapes are patched by the caller).
inline void decode_range_scalar(const uint8_t* sm, const uint8_t* codes, uint32_t from, uint32_t len,
                                const uint8_t* table16, uint8_t* dst, uint32_t& a, uint32_t& b) {
  uint32_t S = 0, T = 0, H = 0;
  uint32_t i = from;
  for (; i + 2 <= len; i += 2) {
    const uint32_t p = codes[i >> 1];
    const uint16_t x0 = combine(sm[i], table16[p & 0x0F]);
    const uint16_t x1 = combine(sm[i + 1], table16[p >> 4]);
    const uint32_t w = uint32_t(x0) | (uint32_t(x1) << 16);
    std::memcpy(dst + 2 * size_t(i), &w, 4);
    S += (x0 & 0xFFu) + (x0 >> 8);
    T += S;
    S += (x1 & 0xFFu) + (x1 >> 8);
    T += S;
    H += (x0 >> 8) + (x1 >> 8);
  }
  if (i < len) {
    const uint16_t x0 = combine(sm[i], table16[codes[i >> 1] & 0x0F]);
    dst[2 * size_t(i)] = uint8_t(x0);
    dst[2 * size_t(i) + 1] = uint8_t(x0 >> 8);
    S += (x0 & 0xFFu) + (x0 >> 8);
    T += S;
    H += x0 >> 8;
  }
  const uint32_t m = len - from;
  a += S;
  b += 2u * (from * S + (m * S - T)) + S + H;
}

uint32_t encode_chunk_scalar(const uint8_t* src, uint32_t len, uint8_t* sm_out, uint8_t* codes_out,
                             const uint8_t* lut, uint16_t* esc_pos, uint8_t* esc_exp, uint32_t& a, uint32_t& b) {
  a = b = 0;
  return encode_range_scalar(src, 0, len, sm_out, codes_out, lut, esc_pos, esc_exp, 0, a, b);
}

void decode_chunk_scalar(const uint8_t* sm, const uint8_t* codes, uint32_t len, const uint8_t* table16,
                         uint8_t* dst, uint32_t& a, uint32_t& b) {
  a = b = 0;
  decode_range_scalar(sm, codes, 0, len, table16, dst, a, b);
}

void copy_checksum_scalar(uint8_t* dst, const uint8_t* src, uint64_t n, uint32_t& a, uint32_t& b) {
  a = b = 0;
  if (dst && n) std::memcpy(dst, src, n);
  checksum_scalar(src, 0, n, a, b);
}

// ---------------------------------------------------------------------------------------------------------------
// AVX-512 kernels
// ---------------------------------------------------------------------------------------------------------------
#if SZ_X86
// GCC 12's AVX-512 intrinsic headers trip -W(maybe-)uninitialized on their own _mm512_undefined_* temporaries
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define SZ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vnni,bmi,bmi2,popcnt")))

// Checksum accumulators over a stream of 256-byte steps x0..x3 (x_v = bytes 64v..64v+63 of the step).
// Local weights k + 1 for byte k of the stream. With W = sum dot(x_v, (64 (v & 1) + t)_t) (weights 0..127 fit s8),
// A_S = bytes of x2/x3, S' = sum over steps of A after the step and J steps:
//   B = 256 (J A - S') + W + 128 A_S + A          (all mod 2^32)
struct Acc {
  __m512i af, as, w0, w1, s;
  uint32_t steps;
};

SZ_AVX512 inline void acc_init(Acc& c) {
  c.af = c.as = c.w0 = c.w1 = c.s = _mm512_setzero_si512();
  c.steps = 0;
}

SZ_AVX512 inline __m512i iota8(int start, int step) {
  alignas(64) uint8_t v[64];
  for (int i = 0; i < 64; ++i) v[i] = uint8_t(start + step * i);
  return _mm512_load_si512(v);
}

struct AccConst {
  __m512i ones, wlo, whi;
};

SZ_AVX512 inline AccConst acc_const() { return {_mm512_set1_epi8(1), iota8(0, 1), iota8(64, 1)}; }

SZ_AVX512 inline void acc_step(Acc& c, const AccConst& k, __m512i x0, __m512i x1, __m512i x2, __m512i x3) {
  c.af = _mm512_dpbusd_epi32(c.af, x0, k.ones);
  c.as = _mm512_dpbusd_epi32(c.as, x2, k.ones);
  c.w0 = _mm512_dpbusd_epi32(c.w0, x0, k.wlo);
  c.w1 = _mm512_dpbusd_epi32(c.w1, x1, k.whi);
  c.af = _mm512_dpbusd_epi32(c.af, x1, k.ones);
  c.as = _mm512_dpbusd_epi32(c.as, x3, k.ones);
  c.w0 = _mm512_dpbusd_epi32(c.w0, x2, k.wlo);
  c.w1 = _mm512_dpbusd_epi32(c.w1, x3, k.whi);
  c.s = _mm512_add_epi32(c.s, _mm512_add_epi32(c.af, c.as));
  ++c.steps;
}

// (not _mm512_reduce_add_epi32: GCC 12's version trips -Wuninitialized inside its own header)
SZ_AVX512 inline uint32_t hsum32(__m512i v) {
  alignas(64) uint32_t t[16];
  _mm512_store_si512(t, v);
  uint32_t s = 0;
  for (int i = 0; i < 16; ++i) s += t[i];
  return s;
}

SZ_AVX512 inline void acc_finish(const Acc& c, uint32_t& a, uint32_t& b) {
  const uint32_t AF = hsum32(c.af);
  const uint32_t AS = hsum32(c.as);
  const uint32_t S = hsum32(c.s);
  const uint32_t W = hsum32(c.w0) + hsum32(c.w1);
  const uint32_t A = AF + AS;
  a = A;
  b = 256u * (c.steps * A - S) + W + 128u * AS + A;
}

// interleave lo/hi byte vectors: out[t] = (t even ? lo : hi)[half + t/2]
SZ_AVX512 inline __m512i idx_interleave(int half) {
  alignas(64) uint8_t v[64];
  for (int t = 0; t < 64; ++t) v[t] = uint8_t((half + t / 2) | ((t & 1) ? 64 : 0));
  return _mm512_load_si512(v);
}

// Encode, 128 elements (256 bytes) per iteration. The exponent -> code lookup never forms the exponent: with
// e = (hi << 1 | lo >> 7) & 0xFF, the 7-bit index of vpermt2b takes hi's low 7 bits (= e >> 1) and lo's top bit
// (= e & 1) picks the even- or odd-exponent table.
SZ_AVX512 uint32_t encode_chunk_avx512(const uint8_t* src, uint32_t len, uint8_t* sm_out, uint8_t* codes_out,
                                       const uint8_t* lut, uint16_t* esc_pos, uint8_t* esc_exp, uint32_t& a,
                                       uint32_t& b) {
  const AccConst kc = acc_const();
  const __m512i ie = iota8(0, 2), io = iota8(1, 2);
  alignas(64) uint8_t te[128], to[128];
  for (int h = 0; h < 128; ++h) {
    te[h] = lut[2 * h];
    to[h] = lut[2 * h + 1];
  }
  const __m512i te0 = _mm512_load_si512(te), te1 = _mm512_load_si512(te + 64);
  const __m512i to0 = _mm512_load_si512(to), to1 = _mm512_load_si512(to + 64);
  const __m512i c80 = _mm512_set1_epi8(char(0x80)), c0f = _mm512_set1_epi8(0x0F);
  Acc acc;
  acc_init(acc);
  uint32_t cnt = 0;
  const uint32_t vec_end = len & ~127u;
  for (uint32_t i = 0; i < vec_end; i += 128) {
    const uint8_t* s = src + 2 * i;
    const __m512i x0 = _mm512_loadu_si512(s), x1 = _mm512_loadu_si512(s + 64);
    const __m512i x2 = _mm512_loadu_si512(s + 128), x3 = _mm512_loadu_si512(s + 192);
    acc_step(acc, kc, x0, x1, x2, x3);
    const __m512i lo0 = _mm512_permutex2var_epi8(x0, ie, x1), hi0 = _mm512_permutex2var_epi8(x0, io, x1);
    const __m512i lo1 = _mm512_permutex2var_epi8(x2, ie, x3), hi1 = _mm512_permutex2var_epi8(x2, io, x3);
    // sm = (hi & 0x80) | (lo & 0x7F)
    _mm512_storeu_si512(sm_out + i, _mm512_ternarylogic_epi32(hi0, lo0, c80, 0xE4));
    _mm512_storeu_si512(sm_out + i + 64, _mm512_ternarylogic_epi32(hi1, lo1, c80, 0xE4));
    const __m512i code0 = _mm512_mask_blend_epi8(_mm512_movepi8_mask(lo0), _mm512_permutex2var_epi8(te0, hi0, te1),
                                                 _mm512_permutex2var_epi8(to0, hi0, to1));
    const __m512i code1 = _mm512_mask_blend_epi8(_mm512_movepi8_mask(lo1), _mm512_permutex2var_epi8(te0, hi1, te1),
                                                 _mm512_permutex2var_epi8(to0, hi1, to1));
    // packed byte j = (code[2j] & 15) | (code[2j+1] << 4) sits in the low byte of u16 lane j (escape flag 0x80
    // drops out), then the low bytes of both vectors are gathered into 64 bytes
    const __m512i pk0 = _mm512_ternarylogic_epi32(code0, _mm512_srli_epi16(code0, 4), c0f, 0xE4);
    const __m512i pk1 = _mm512_ternarylogic_epi32(code1, _mm512_srli_epi16(code1, 4), c0f, 0xE4);
    _mm512_storeu_si512(codes_out + i / 2, _mm512_permutex2var_epi8(pk0, ie, pk1));
    uint64_t e0 = _mm512_movepi8_mask(code0), e1 = _mm512_movepi8_mask(code1);
    if (__builtin_expect((e0 | e1) != 0, 0)) {
      for (int half = 0; half < 2; ++half) {
        uint64_t esc = half ? e1 : e0;
        while (esc) {
          const uint32_t p = i + 64 * half + uint32_t(_tzcnt_u64(esc));
          esc = _blsr_u64(esc);
          esc_pos[cnt] = uint16_t(p);
          esc_exp[cnt] = uint8_t(exponent_of(uint16_t(src[2 * p] | (src[2 * p + 1] << 8))));
          ++cnt;
        }
      }
    }
  }
  acc_finish(acc, a, b);
  if (vec_end < len) cnt = encode_range_scalar(src, vec_end, len, sm_out, codes_out, lut, esc_pos, esc_exp, cnt, a, b);
  return cnt;
}

// Decode, 128 elements per iteration: the 64 packed code bytes are spread 4 per qword, vpmultishiftqb pulls each
// nibble to its own byte (bits 4..5 of that byte are the neighbour's, the 4x replicated table ignores them),
// vpermb maps codes to exponents, and lo/hi bytes are assembled and interleaved.
SZ_AVX512 void decode_chunk_avx512(const uint8_t* sm, const uint8_t* codes, uint32_t len, const uint8_t* table16,
                                   uint8_t* dst, uint32_t& a, uint32_t& b) {
  const AccConst kc = acc_const();
  const __m512i il0 = idx_interleave(0), il1 = idx_interleave(32);
  alignas(64) uint8_t buf[64];
  for (int i = 0; i < 64; ++i) buf[i] = table16[i & 15];
  const __m512i tab = _mm512_load_si512(buf);
  for (int q = 0; q < 8; ++q)
    for (int j = 0; j < 8; ++j) buf[8 * q + j] = uint8_t(4 * q + (j & 3));
  const __m512i spread0 = _mm512_load_si512(buf);
  for (int q = 0; q < 8; ++q)
    for (int j = 0; j < 8; ++j) buf[8 * q + j] = uint8_t(32 + 4 * q + (j & 3));
  const __m512i spread1 = _mm512_load_si512(buf);
  for (int q = 0; q < 8; ++q)
    for (int j = 0; j < 8; ++j) buf[8 * q + j] = uint8_t(4 * j);
  const __m512i nib = _mm512_load_si512(buf);
  const __m512i c7f = _mm512_set1_epi8(0x7F), c80 = _mm512_set1_epi8(char(0x80));
  Acc acc;
  acc_init(acc);
  const uint32_t vec_end = len & ~127u;
  for (uint32_t i = 0; i < vec_end; i += 128) {
    const __m512i p = _mm512_loadu_si512(codes + i / 2);
    const __m512i s0 = _mm512_loadu_si512(sm + i), s1 = _mm512_loadu_si512(sm + i + 64);
    const __m512i e0 =
        _mm512_permutexvar_epi8(_mm512_multishift_epi64_epi8(nib, _mm512_permutexvar_epi8(spread0, p)), tab);
    const __m512i e1 =
        _mm512_permutexvar_epi8(_mm512_multishift_epi64_epi8(nib, _mm512_permutexvar_epi8(spread1, p)), tab);
    const __m512i lo0 = _mm512_ternarylogic_epi32(s0, _mm512_slli_epi16(e0, 7), c7f, 0xE4);
    const __m512i hi0 = _mm512_ternarylogic_epi32(s0, _mm512_srli_epi16(e0, 1), c80, 0xE4);
    const __m512i lo1 = _mm512_ternarylogic_epi32(s1, _mm512_slli_epi16(e1, 7), c7f, 0xE4);
    const __m512i hi1 = _mm512_ternarylogic_epi32(s1, _mm512_srli_epi16(e1, 1), c80, 0xE4);
    const __m512i x0 = _mm512_permutex2var_epi8(lo0, il0, hi0), x1 = _mm512_permutex2var_epi8(lo0, il1, hi0);
    const __m512i x2 = _mm512_permutex2var_epi8(lo1, il0, hi1), x3 = _mm512_permutex2var_epi8(lo1, il1, hi1);
    uint8_t* d = dst + 2 * i;
    _mm512_storeu_si512(d, x0);
    _mm512_storeu_si512(d + 64, x1);
    _mm512_storeu_si512(d + 128, x2);
    _mm512_storeu_si512(d + 192, x3);
    acc_step(acc, kc, x0, x1, x2, x3);
  }
  acc_finish(acc, a, b);
  if (vec_end < len) decode_range_scalar(sm, codes, vec_end, len, table16, dst, a, b);
}

SZ_AVX512 void copy_checksum_avx512(uint8_t* dst, const uint8_t* src, uint64_t n, uint32_t& a, uint32_t& b) {
  const AccConst kc = acc_const();
  uint32_t A = 0, B = 0;
  uint64_t done = 0;
  // blocks of at most 2^24 bytes (the step counter stays small; all sums are mod 2^32 anyway)
  while (n - done >= 256) {
    const uint64_t blk = std::min<uint64_t>((n - done) & ~uint64_t(255), uint64_t(1) << 24);
    Acc acc;
    acc_init(acc);
    const uint8_t* s = src + done;
    uint8_t* d = dst ? dst + done : nullptr;
    for (uint64_t i = 0; i < blk; i += 256) {
      const __m512i x0 = _mm512_loadu_si512(s + i), x1 = _mm512_loadu_si512(s + i + 64);
      const __m512i x2 = _mm512_loadu_si512(s + i + 128), x3 = _mm512_loadu_si512(s + i + 192);
      if (d) {
        _mm512_storeu_si512(d + i, x0);
        _mm512_storeu_si512(d + i + 64, x1);
        _mm512_storeu_si512(d + i + 128, x2);
        _mm512_storeu_si512(d + i + 192, x3);
      }
      acc_step(acc, kc, x0, x1, x2, x3);
    }
    uint32_t la, lb;
    acc_finish(acc, la, lb);
    A += la;
    B += lb + uint32_t(done) * la;
    done += blk;
  }
  if (done < n) {
    uint32_t la = 0, lb = 0;
    if (dst) std::memcpy(dst + done, src + done, n - done);
    checksum_scalar(src + done, 0, n - done, la, lb);
    A += la;
    B += lb + uint32_t(done) * la;
  }
  a = A;
  b = B;
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
}
#pragma GCC diagnostic pop
#else
bool cpu_has_avx512() { return false; }
#endif

// ---------------------------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------------------------
int g_max_level = -1;
int g_level = -1;

void init_levels() {
  if (g_max_level >= 0) return;
  g_max_level = cpu_has_avx512() ? 1 : 0;
  g_level = g_max_level;
  if (const char* env = std::getenv("SPLITZIP_CPU_SIMD")) {
    const int want = std::atoi(env);
    g_level = std::max(0, std::min(want, g_max_level));
  }
}

struct Kernels {
  uint32_t (*encode_chunk)(const uint8_t*, uint32_t, uint8_t*, uint8_t*, const uint8_t*, uint16_t*, uint8_t*,
                           uint32_t&, uint32_t&);
  void (*decode_chunk)(const uint8_t*, const uint8_t*, uint32_t, const uint8_t*, uint8_t*, uint32_t&, uint32_t&);
  void (*copy_checksum)(uint8_t*, const uint8_t*, uint64_t, uint32_t&, uint32_t&);
};

Kernels kernels() {
  init_levels();
#if SZ_X86
  if (g_level >= 1) return {encode_chunk_avx512, decode_chunk_avx512, copy_checksum_avx512};
#endif
  return {encode_chunk_scalar, decode_chunk_scalar, copy_checksum_scalar};
}

// ---------------------------------------------------------------------------------------------------------------
// Region cursors: hand out the next `bytes` of the logical concatenation, directly or via a staging buffer
// ---------------------------------------------------------------------------------------------------------------
template <class Region>
struct RegionCursor {
  using Ptr = decltype(Region::ptr);
  const Region* r;
  size_t nr;
  size_t idx = 0;
  uint64_t off = 0;

  RegionCursor(const Region* regions, size_t n) : r(regions), nr(n) {}
  void skip_empty() {
    while (idx < nr && off >= r[idx].n_bytes) {
      ++idx;
      off = 0;
    }
  }
  // Pointer to the next `bytes` if they lie in one region (cursor advances), else nullptr.
  Ptr direct(uint64_t bytes) {
    skip_empty();
    if (idx < nr && r[idx].n_bytes - off >= bytes) {
      Ptr p = r[idx].ptr + off;
      off += bytes;
      return p;
    }
    return nullptr;
  }
  // Advance over the next `bytes`, calling fn(region pointer, offset within the `bytes`, length) per piece.
  template <class Fn>
  void walk(uint64_t bytes, Fn&& fn) {
    uint64_t done = 0;
    while (done < bytes) {
      skip_empty();
      const uint64_t take = std::min(bytes - done, r[idx].n_bytes - off);
      fn(r[idx].ptr + off, done, take);
      done += take;
      off += take;
    }
  }
};

struct SrcCursor : RegionCursor<SrcRegion> {
  using RegionCursor::RegionCursor;
  // The next `bytes` of the source: in place when they lie in one region, else gathered into `staging`.
  const uint8_t* next(uint64_t bytes, uint8_t* staging) {
    if (const uint8_t* p = direct(bytes)) return p;
    walk(bytes, [&](const uint8_t* src, uint64_t at, uint64_t n) { std::memcpy(staging + at, src, n); });
    return staging;
  }
};

struct DstCursor : RegionCursor<DstRegion> {
  using RegionCursor::RegionCursor;
  // Use direct() first; when it returns nullptr, decode into a staging buffer and scatter() it.
  void scatter(const uint8_t* staging, uint64_t bytes) {
    walk(bytes, [&](uint8_t* dst, uint64_t at, uint64_t n) { std::memcpy(dst, staging + at, n); });
  }
};

struct Scratch {
  std::vector<uint8_t> staging;   // one chunk of elements
  std::vector<uint16_t> esc_pos;  // escapes of one chunk
  std::vector<uint8_t> esc_exp;
  std::vector<uint8_t> all_exp;   // escape exponents of the whole payload (encode)
  std::vector<uint16_t> all_pos;  // escape positions of the whole payload (EXP2L encode)
  std::vector<uint16_t> esc_counts;  // escapes per chunk (EXP2L encode)
  std::vector<uint16_t> sec_counts;  // markers per chunk (EXP2L encode)
  std::vector<uint8_t> sec;       // one chunk's secondary codes, one per byte (+128 slack for vector loads)
};

Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

std::string dtype_list() { return "0 (uint8), 1 (bfloat16), 2 (float16), 3 (float32), 4 (float8_e4m3fn), 5 (float8_e5m2)"; }

uint64_t encode_raw(const SrcRegion* regions, size_t nr, int dtype, uint64_t n, uint64_t raw_bytes, uint8_t* out,
                    uint64_t tag, const Kernels& k) {
  uint8_t* body = out + kHeaderBytes;
  Checksum cs;
  uint64_t off = 0;
  for (size_t i = 0; i < nr; ++i) {
    if (!regions[i].n_bytes) continue;
    uint32_t a, b;
    k.copy_checksum(body + off, regions[i].ptr, regions[i].n_bytes, a, b);
    cs.add_block(off, a, b);
    off += regions[i].n_bytes;
  }
  pack_header(make_header(dtype, kModeRaw, 0, 0, nullptr, n, 0, raw_bytes, cs.a, cs.b, tag), out);
  return kHeaderBytes + raw_bytes;
}

// Returns the payload length, or 0 when the EXP4 body would not be smaller than the raw bytes.
uint64_t encode_exp4(const SrcRegion* regions, size_t nr, uint64_t n, const uint8_t* cb16, int n_codes,
                     int chunk_log2, uint8_t* out, uint64_t tag, const Kernels& k) {
  const uint64_t raw_bytes = 2 * n;
  const Exp4Layout lay0 = Exp4Layout::compute(n, chunk_log2, 0);
  if (lay0.body_bytes >= raw_bytes) return 0;
  uint8_t lut[256];
  std::memset(lut, kLutEscape, sizeof lut);
  for (int j = 0; j < n_codes; ++j) lut[cb16[j]] = uint8_t(j);

  const uint32_t C = 1u << chunk_log2;
  Scratch& sc = scratch();
  sc.staging.resize(2 * size_t(C));
  sc.esc_pos.resize(C);
  sc.esc_exp.resize(C);
  sc.all_exp.clear();
  uint8_t* body = out + kHeaderBytes;
  SrcCursor cur(regions, nr);
  Checksum cs;
  uint64_t m = 0;
  for (uint64_t c = 0; c < lay0.n_chunks; ++c) {
    const uint64_t start = c * C;
    const uint32_t len = uint32_t(std::min<uint64_t>(C, n - start));
    const uint8_t* src = cur.next(2 * uint64_t(len), sc.staging.data());
    uint32_t a, b;
    const uint32_t cnt = k.encode_chunk(src, len, body + start, body + lay0.off_codes + start / 2, lut,
                                        sc.esc_pos.data(), sc.esc_exp.data(), a, b);
    cs.add_block(2 * start, a, b);
    store_u16(body + lay0.off_counts + 2 * c, uint16_t(cnt));
    if (cnt) {
      if (Exp4Layout::compute(n, chunk_log2, m + cnt).body_bytes >= raw_bytes) return 0;
      std::memcpy(body + lay0.off_pos + 2 * m, sc.esc_pos.data(), 2 * size_t(cnt));
      sc.all_exp.insert(sc.all_exp.end(), sc.esc_exp.begin(), sc.esc_exp.begin() + cnt);
      m += cnt;
    }
  }
  const Exp4Layout lay = Exp4Layout::compute(n, chunk_log2, m);
  // zero every gap between sections
  std::memset(body + n, 0, lay.off_codes - n);
  const uint64_t codes_end = lay.off_codes + (n + 1) / 2;
  std::memset(body + codes_end, 0, lay.off_counts - codes_end);
  const uint64_t counts_end = lay.off_counts + 2 * lay.n_chunks;
  std::memset(body + counts_end, 0, lay.off_pos - counts_end);
  const uint64_t pos_end = lay.off_pos + 2 * m;
  std::memset(body + pos_end, 0, lay.off_exp - pos_end);
  if (m) std::memcpy(body + lay.off_exp, sc.all_exp.data(), m);
  pack_header(make_header(kDtypeBFloat16, kModeExp4, n_codes, chunk_log2, cb16, n, m, lay.body_bytes, cs.a, cs.b, tag),
              out);
  return kHeaderBytes + lay.body_bytes;
}

void check_regions_bytes(uint64_t bytes, int esize, size_t i, const char* what) {
  if (bytes % uint64_t(esize))
    throw ArgumentError(std::string(what) + " region " + std::to_string(i) + " has " + std::to_string(bytes) +
                        " bytes, not a multiple of the element size " + std::to_string(esize));
}

Checksum decode_raw(const uint8_t* body, const DstRegion* regions, size_t nr, const Kernels& k) {
  Checksum cs;
  uint64_t off = 0;
  for (size_t i = 0; i < nr; ++i) {
    if (!regions[i].n_bytes) continue;
    uint32_t a, b;
    k.copy_checksum(regions[i].ptr, body + off, regions[i].n_bytes, a, b);
    cs.add_block(off, a, b);
    off += regions[i].n_bytes;
  }
  return cs;
}

// FORMAT.md §6 step 4, the chunk counts: they sum to n_escapes and none exceeds its chunk's length.
template <class Layout>
void check_chunk_counts(const uint8_t* counts, const Layout& lay) {
  const uint64_t C = uint64_t(1) << lay.chunk_log2;
  uint64_t total = 0;
  bool over = false;
  for (uint64_t c = 0; c < lay.n_chunks; ++c) {
    const uint32_t cnt = load_u16(counts + 2 * c);
    total += cnt;
    over |= cnt > std::min<uint64_t>(C, lay.n - c * C);
  }
  if (total != lay.n_escapes) throw PayloadError(SZ_ERR_ESC_SUM, total);
  if (over) throw PayloadError(SZ_ERR_ESC_COUNT);
}

// Patch the `cnt` escapes of one decoded chunk (dst, len elements; sm its sm bytes) starting at escape `esc`,
// each checked by check_escape before it is written; adjusts the chunk's checksum terms. Returns false when a
// position is out of order (that escape is skipped; the caller reports SZ_ERR_ESC_ORDER unless a position
// outside its chunk, the lower status, is found first).
bool patch_escapes(const uint8_t* pos, const uint8_t* exps, uint64_t esc, uint32_t cnt, const uint8_t* sm,
                   uint32_t len, uint8_t* dst, uint32_t& a, uint32_t& b) {
  bool in_order = true;
  for (uint32_t j = 0; j < cnt; ++j, ++esc) {
    const uint32_t p = load_u16(pos + 2 * esc);
    const int est = check_escape(p, j == 0, j ? load_u16(pos + 2 * (esc - 1)) : 0u, len);
    if (est == SZ_ERR_ESC_POS) throw PayloadError(est);
    if (est != SZ_OK) {
      in_order = false;
      continue;
    }
    const uint16_t x = combine(sm[p], exps[esc]);
    const uint32_t lo_n = x & 0xFF, hi_n = x >> 8;
    const uint32_t lo_o = dst[2 * p], hi_o = dst[2 * p + 1];
    dst[2 * p] = uint8_t(lo_n);
    dst[2 * p + 1] = uint8_t(hi_n);
    a += (lo_n - lo_o) + (hi_n - hi_o);
    b += (2 * p + 1) * (lo_n - lo_o) + (2 * p + 2) * (hi_n - hi_o);
  }
  return in_order;
}

Checksum decode_exp4(const Header& h, const uint8_t* body, const DstRegion* regions, size_t nr, const Kernels& k) {
  const uint64_t n = h.n_elems;
  const Exp4Layout lay = Exp4Layout::compute(n, h.chunk_log2, h.n_escapes);
  const uint32_t C = 1u << h.chunk_log2;
  const uint8_t* counts = body + lay.off_counts;
  check_chunk_counts(counts, lay);
  Scratch& sc = scratch();
  sc.staging.resize(2 * size_t(C));
  DstCursor cur(regions, nr);
  Checksum cs;
  bool in_order = true;
  uint64_t esc = 0;
  for (uint64_t c = 0; c < lay.n_chunks; ++c) {
    const uint64_t start = c * C;
    const uint32_t len = uint32_t(std::min<uint64_t>(C, n - start));
    uint8_t* dst = cur.direct(2 * uint64_t(len));
    const bool staged = dst == nullptr;
    if (staged) dst = sc.staging.data();
    uint32_t a, b;
    k.decode_chunk(body + start, body + lay.off_codes + start / 2, len, h.codebook, dst, a, b);
    const uint32_t cnt = load_u16(counts + 2 * c);
    in_order &= patch_escapes(body + lay.off_pos, body + lay.off_exp, esc, cnt, body + start, len, dst, a, b);
    esc += cnt;
    cs.add_block(2 * start, a, b);
    if (staged) cur.scatter(dst, 2 * uint64_t(len));
  }
  if (!in_order) throw PayloadError(SZ_ERR_ESC_ORDER);
  return cs;
}

#include "exp2l_cpu.inc"

}  // namespace

int simd_level() {
  init_levels();
  return g_level;
}
int max_simd_level() {
  init_levels();
  return g_max_level;
}
int set_simd_level(int level) {
  init_levels();
  g_level = std::max(0, std::min(level, g_max_level));
  return g_level;
}

uint64_t encode(const SrcRegion* regions, size_t n_regions, int dtype, const uint8_t* codebook, int n_codes,
                int chunk_log2, uint8_t* out, uint64_t out_cap, uint64_t tag, bool two_level) {
  if (!dtype_known(dtype))
    throw ArgumentError("unknown dtype code " + std::to_string(dtype) + "; known codes: " + dtype_list());
  const int esize = dtype_elem_size(dtype);
  uint64_t raw_bytes = 0;
  for (size_t i = 0; i < n_regions; ++i) {
    check_regions_bytes(regions[i].n_bytes, esize, i, "source");
    if (regions[i].n_bytes && !regions[i].ptr) throw ArgumentError("source region " + std::to_string(i) + " is null");
    raw_bytes += regions[i].n_bytes;
  }
  const uint64_t n = raw_bytes / uint64_t(esize);
  if (out_cap < encode_capacity(n, uint64_t(esize)))
    throw ArgumentError("output buffer holds " + std::to_string(out_cap) + " bytes, encoding " + std::to_string(n) +
                        " elements needs " + std::to_string(encode_capacity(n, uint64_t(esize))));
  uint8_t cb16[16] = {0};
  const bool use_codebook = codebook != nullptr && n_codes > 0;
  if (use_codebook) {
    if (n_codes > kMaxCodebook)
      throw ArgumentError("a codebook holds 1.." + std::to_string(kMaxCodebook) + " exponents, got " +
                          std::to_string(n_codes));
    bool seen[256] = {false};
    for (int j = 0; j < n_codes; ++j) {
      if (seen[codebook[j]]) throw ArgumentError("codebook exponents must be distinct");
      seen[codebook[j]] = true;
      if (j < kMaxCodes) cb16[j] = codebook[j];
    }
    if (chunk_log2 < kMinChunkLog2 || chunk_log2 > kMaxChunkLog2)
      throw ArgumentError("chunk_log2 must be in " + std::to_string(kMinChunkLog2) + ".." +
                          std::to_string(kMaxChunkLog2) + ", got " + std::to_string(chunk_log2));
  } else if (n_codes < 0) {
    throw ArgumentError("negative codebook size");
  }
  const Kernels k = kernels();
  if (use_codebook && dtype_exp4_allowed(dtype) && n > 0) {
    if (two_level) {
      const uint64_t len = encode_exp2l(regions, n_regions, n, codebook, n_codes, chunk_log2, out, tag,
                                        exp2l_kernels(g_level));
      if (len) return len;
    }
    const uint64_t len = encode_exp4(regions, n_regions, n, cb16, std::min(n_codes, kMaxCodes), chunk_log2, out,
                                     tag, k);
    if (len) return len;
  }
  return encode_raw(regions, n_regions, dtype, n, raw_bytes, out, tag, k);
}

void decode(const uint8_t* payload, uint64_t payload_len, const DstRegion* regions, size_t n_regions, int dtype,
            uint64_t expected_tag) {
  Header h;
  const int st = validate_header(payload, payload_len, expected_tag, &h);
  if (st != SZ_OK) throw PayloadError(st);
  if (!dtype_known(dtype))
    throw ArgumentError("unknown destination dtype code " + std::to_string(dtype) + "; known codes: " + dtype_list());
  const int esize = dtype_elem_size(dtype);
  uint64_t dst_bytes = 0;
  for (size_t i = 0; i < n_regions; ++i) {
    check_regions_bytes(regions[i].n_bytes, esize, i, "destination");
    if (regions[i].n_bytes && !regions[i].ptr)
      throw ArgumentError("destination region " + std::to_string(i) + " is null");
    dst_bytes += regions[i].n_bytes;
  }
  const int dst_st = check_destination(h, dtype, dst_bytes / uint64_t(esize));
  if (dst_st != SZ_OK) throw PayloadError(dst_st);
  const Kernels k = kernels();
  const uint8_t* body = payload + header_bytes_of(h.version);
  const Checksum cs = h.mode == kModeRaw    ? decode_raw(body, regions, n_regions, k)
                      : h.mode == kModeExp4 ? decode_exp4(h, body, regions, n_regions, k)
                                            : decode_exp2l(h, body, regions, n_regions, exp2l_kernels(g_level));
  if (cs.a != h.checksum_a || cs.b != h.checksum_b) throw PayloadError(SZ_ERR_CHECKSUM);
}

}  // namespace cpu
}  // namespace splitzip
