// SplitZip-KV CUDA codec (FORMAT.md v2; decodes v1 too). Pure CUDA: no torch headers; the launchers take raw device
// pointers and a cudaStream_t (see splitzip_cuda.h). Compiles stand-alone:
//   nvcc -c -O3 -std=c++17 -I csrc/include csrc/cuda/splitzip_cuda.cu   (scripts/check_cuda_compile.sh)
// and, for tests without a GPU, as plain C++ against csrc/cuda/emu/cuda_emu.h (tests/test_codec_cuda_emu.py).
//
// ENCODE (bfloat16 + codebook), stream-ordered, no host synchronization:
//   0. cudaMemsetAsync clears the 64-byte control block and the look-back state (one u64 per tile).
//   1. enc_exp4_kernel: one 256-thread block per tile of max(2^chunk_log2, 8192) elements (whole chunks); the
//      tile index comes from an atomic counter, so tiles start in order. ONE read of the input (16-byte loads,
//      four in flight per thread): writes the sm bytes and packed codes, the tile's chunk counts, adds the
//      checksum terms (atomicAdd: order-free mod 2^32, so deterministic), and publishes its escape count for a
//      decoupled look-back (single-pass exclusive scan, one warp looks back 32 tiles at a time). With its
//      exclusive prefix each warp writes its escapes in element order (warp scan of per-thread counts over the
//      per-pass escape bits kept in shared memory): positions straight into esc_pos (whose offset does not
//      depend on the escape total), exponents into a workspace staging array (their final offset does).
//      Escapes are skipped once the prefix alone proves the payload RAW (this also bounds the staging array).
//   2. enc_finish_kernel: every block reads the escape total from the last tile's state and decides EXP4 vs RAW
//      (FORMAT.md §5.1) by itself; block 0 writes the header (CRC-32 over a shared-memory table) and the zero
//      gaps; the grid moves the staged exponents to esc_exp, or (RAW fallback) copies the input bytes.
// ENCODE RAW (other dtypes, no codebook, inputs too small to gain): enc_raw_kernel (copy + checksum), then
//   enc_finish_kernel writes the header.
// ENCODE with a two-level codebook (FORMAT.md §3a, §5): the EXP2L kernels of splitzip_cuda_exp2l_enc.cuh run first
//   (one read of the input, two look-backs) and choose the mode on the device; steps 1-2 above are queued behind
//   them and run only if EXP2L loses (a device gate word; otherwise their blocks exit at once).
// DECODE, no host synchronization:
//   0. cudaMemsetAsync clears the control block and the look-back state.
//   1. dec_header_kernel (one block): validates the header (FORMAT.md §6 steps 1-3: version 1 or 2, the expected
//      transfer tag of §6a) against the payload length and the destination, writes the body offset (64 or 96)
//      and the layout into the control block and the verdict into status[0].
//   2. dec_main_kernel: persistent grid (SMs x occupancy); blocks take tiles in order from an atomic counter.
//      EXP4 tiles (max(2^chunk_log2, 16384) elements): warp 0 reads the tile's chunk counts (bounds-checked
//      against the chunk lengths) while the first dense loads are in flight and publishes their sum; the block
//      decodes the dense sections (16-byte sm loads, 16-byte stores), learns its first escape index from the
//      look-back, checks it against n_escapes (so esc_pos / esc_exp are never read past n_escapes), then
//      patches each escape after checking its position against its chunk length, adjusting the checksum terms
//      by the change of the patched element. RAW tiles copy and checksum. The last block to finish compares
//      the checksum. Errors merge into status[0] as "smallest code wins", the codes following the check order
//      of FORMAT.md §6, so the verdict equals the reference decoder's.
//   EXP2L payloads (bf16 destinations): dec2l_check_kernel validates all of FORMAT.md §6 step 4 before
//      dec2l_write_kernel writes anything (splitzip_cuda_exp2l_dec.cuh); dec_main_kernel leaves them alone.
// Bounds: every write goes to an element index < n of the destination region table, or into the caller's output
// buffer below 96 + n*elem_size + 64 / the workspace; every payload read is below header bytes + body_bytes <=
// payload_len
// (header validated first; the tail group's vector reads stay inside the dense sections, see host_format_test).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
#error "splitzip_cuda.cu needs sm_70 or newer (__nanosleep, ld.relaxed.gpu / st.relaxed.gpu); build for sm_80 / sm_90"
#endif

#if defined(SPLITZIP_CUDA_EMU)  // CPU emulation build for tests (csrc/cuda/emu/cuda_emu.h)
#include "emu/cuda_emu.h"
#define SZ_LAUNCH(kernel, grid, stream, ...) ::sz_emu::launch(kernel, grid, kThreads, __VA_ARGS__)
#else
#include <cuda_runtime.h>
#define SZ_LAUNCH(kernel, grid, stream, ...) kernel<<<grid, kThreads, 0, stream>>>(__VA_ARGS__)
#endif

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "splitzip/format.h"
#include "splitzip_cuda.h"
#include "splitzip_cuda_bits.cuh"
#include "splitzip_cuda_format.cuh"

namespace splitzip {
namespace cudak {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 8;                                // elements per thread per pass (one 16-byte vector)
constexpr int kPassElems = kThreads * kGroup;            // 2048
constexpr uint32_t kEncRawTileBytes = 4 * kThreads * 16;  // 16 KiB per RAW-encode tile
constexpr int kDecPassElems = kThreads * 16;            // decode: 16 elements per thread per pass
constexpr uint32_t kDecTileBytes = 8 * kThreads * 16;     // 32 KiB = the smallest bf16 EXP4 decode tile
constexpr int kDecRawUBf16 = 2;                           // RAW tiles of the bf16 decode kernel: 8 KiB
constexpr int kDecRawUOther = 4;                          // RAW tiles of the other dtypes: 16 KiB
constexpr uint64_t kFlagAgg = uint64_t(1) << 62;        // look-back: tile aggregate available
constexpr uint64_t kFlagPre = uint64_t(2) << 62;        // look-back: inclusive prefix available
constexpr uint64_t kValMask = kFlagAgg - 1;
constexpr unsigned kFull = 0xFFFFFFFFu;

static_assert(kPassElems * 4 == 8192, "exp4_encode_tile_elems: at least 4 passes of 2048 elements per tile");
static_assert(kDecPassElems * 4 == 16384, "exp4_decode_tile_elems: at least 4 passes of 4096 elements per tile");
static_assert(kDecTileBytes == 16384 * 2, "look-back state: one slot per 32 KiB of bf16 output");
static_assert((1 << kMaxChunkLog2) / kPassElems == 16, "at most 16 passes per tile");

// ---- small device helpers ----------------------------------------------------------------------------------------
__device__ __forceinline__ uint64_t ld_relaxed(const uint64_t* p) {
#if defined(SPLITZIP_CUDA_EMU)
  return __atomic_load_n(p, __ATOMIC_RELAXED);
#else
  uint64_t v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
#endif
}
__device__ __forceinline__ void st_relaxed(uint64_t* p, uint64_t v) {
#if defined(SPLITZIP_CUDA_EMU)
  __atomic_store_n(p, v, __ATOMIC_RELAXED);
#else
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
#endif
}

__device__ __forceinline__ uint32_t vload(const unsigned int* p) {
  return *reinterpret_cast<const volatile unsigned int*>(p);
}

__device__ __forceinline__ uint32_t warp_incl_scan(uint32_t v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const uint32_t o = __shfl_up_sync(kFull, v, d);
    if (lane >= d) v += o;
  }
  return v;
}

__device__ __forceinline__ uint32_t warp_sum_u32(uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_add_sync(kFull, v);
#else
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(kFull, v, d);
  return v;
#endif
}

__device__ __forceinline__ uint64_t warp_sum_u64(uint64_t v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(kFull, v, d);
  return v;
}

// Smallest non-zero code wins (codes follow the check order of FORMAT.md §6).
__device__ __forceinline__ void record_error(uint32_t* status, uint32_t code) {
  uint32_t old = *reinterpret_cast<volatile uint32_t*>(status);
  while (old == 0u || code < old) {
    const uint32_t prev = atomicCAS(status, old, code);
    if (prev == old) break;
    old = prev;
  }
}

// Tile aggregate for the look-back (tile 0 publishes its inclusive prefix directly).
__device__ __forceinline__ void publish_aggregate(uint64_t* state, uint32_t tile, uint64_t agg) {
  st_relaxed(state + tile, (tile == 0 ? kFlagPre : kFlagAgg) | agg);
}

// Decoupled look-back, executed by all 32 lanes of ONE warp after publish_aggregate(). Returns the exclusive
// prefix of `tile` and publishes its inclusive prefix. Tiles are numbered in the order their blocks started
// (atomic counter), so every predecessor is running or done and the spin terminates.
__device__ __forceinline__ uint64_t lookback_exclusive(uint64_t* state, uint32_t tile, uint64_t agg) {
  const int lane = threadIdx.x & 31;
  uint64_t excl = 0;
  if (tile > 0) {
    int64_t base = int64_t(tile) - 1;
    while (true) {
      const int64_t idx = base - lane;
      uint64_t v = kFlagPre;  // "before tile 0": prefix 0
      if (idx >= 0) {
        v = ld_relaxed(state + idx);
        while ((v >> 62) == 0) {
          __nanosleep(20);
          v = ld_relaxed(state + idx);
        }
      }
      const unsigned pre = __ballot_sync(kFull, (v >> 62) == 2);
      const int stop = pre ? (__ffs(pre) - 1) : 31;  // nearest tile with a full prefix
      excl += warp_sum_u64(lane <= stop ? (v & kValMask) : 0);
      if (pre) break;
      base -= 32;
    }
  }
  if (lane == 0) st_relaxed(state + tile, kFlagPre | (excl + agg));
  return excl;
}

// ---- region tables -----------------------------------------------------------------------------------------------
struct RegionLoc {
  uint64_t base;  // device address of the region's first element
  int64_t start;  // element index (in the concatenation) of that element
  int64_t end;    // one past the region's last element
};

// Region holding element i (0 <= i < R.n).
__device__ __forceinline__ RegionLoc region_of(const SzRegions& R, int64_t i) {
  RegionLoc L;
  if (R.ptrs == nullptr) {
    L.base = R.ptr0;
    L.start = 0;
    L.end = R.n;
  } else if (R.prefix == nullptr) {
    int64_t r = i / R.uniform;
    if (r >= R.count) r = R.count - 1;
    L.base = R.ptrs[r];
    L.start = r * R.uniform;
    L.end = L.start + R.uniform;
  } else {  // prefix[lo] <= i < prefix[hi]; ends on the non-empty region holding i
    int64_t lo = 0, hi = R.count;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) >> 1;
      if (R.prefix[mid] <= i) lo = mid; else hi = mid;
    }
    L.base = R.ptrs[lo];
    L.start = R.prefix[lo];
    L.end = R.prefix[lo + 1];
  }
  return L;
}

__device__ __forceinline__ uint16_t load_elem16(const SzRegions& R, int64_t i) {
  const RegionLoc L = region_of(R, i);
  return reinterpret_cast<const uint16_t*>(L.base)[i - L.start];
}
__device__ __forceinline__ void store_elem16(const SzRegions& R, int64_t i, uint16_t x) {
  const RegionLoc L = region_of(R, i);
  reinterpret_cast<uint16_t*>(L.base)[i - L.start] = x;
}

// Byte kb (< n*esize) of the concatenation, with a cursor L over the region table.
__device__ __forceinline__ uint8_t* region_byte(const SzRegions& R, int esize, uint64_t kb, RegionLoc& L) {
  const int64_t e = int64_t(kb / uint64_t(esize));
  if (e < L.start || e >= L.end) L = region_of(R, e);
  return reinterpret_cast<uint8_t*>(L.base) + (kb - uint64_t(L.start) * uint64_t(esize));
}

// ---- per-group bit logic (splitzip_cuda_bits.cuh) on uint4 vectors -------------------------------------------------
// Checksum terms of one 16-byte vector whose first byte is byte k0 of the data.
__device__ __forceinline__ void checksum_vec(const uint4 v, uint32_t k0, uint32_t& ca, uint32_t& cb) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  cudabits::checksum16(w, k0, ca, cb);
}

// 8 elements -> sm bytes, packed codes, escape bits (lut[e] = code, or kLutEscape).
__device__ __forceinline__ void encode_group(const uint4 v, const uint8_t* lut, uint32_t& sm_lo, uint32_t& sm_hi,
                                             uint32_t& codes, uint32_t& m8) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  cudabits::encode8(w, lut, sm_lo, sm_hi, codes, m8);
}

// 8 sm bytes + 8 code nibbles -> 8 bf16 elements (table: 16 exponents, zero-filled past n_codes).
__device__ __forceinline__ uint4 decode_group(const uint2 smv, uint32_t cw, const uint8_t* table) {
  uint32_t w[4];
  cudabits::decode8(smv.x, smv.y, cw, table, w);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Slow paths (tile spans regions, unaligned region, tail of the data): element / byte at a time, loops kept
// rolled so that they cost neither registers nor code size in the vectorized paths.

// Elements [g, g+8) of the source, g < tend; elements >= tend read as 0.
__device__ __forceinline__ uint4 load_group_slow(const SzRegions& R, int64_t g, int64_t tend) {
  uint64_t lo = 0, hi = 0;
  RegionLoc L = region_of(R, g);
#pragma unroll 1
  for (int k = 0; k < kGroup && g + k < tend; ++k) {
    const int64_t i = g + k;
    if (i >= L.end) L = region_of(R, i);
    const uint64_t x = reinterpret_cast<const uint16_t*>(L.base)[i - L.start];
    if (k < 4) lo |= x << (16 * k); else hi |= x << (16 * (k - 4));
  }
  return make_uint4(uint32_t(lo), uint32_t(lo >> 32), uint32_t(hi), uint32_t(hi >> 32));
}

// Store the first nvalid elements of w at [g, g+nvalid) element by element; returns w with the elements
// past nvalid zeroed (so they stay out of the checksum).
__device__ __forceinline__ uint4 store_group_slow(const SzRegions& R, int64_t g, int nvalid, uint4 w) {
  uint64_t lo = (uint64_t(w.y) << 32) | w.x, hi = (uint64_t(w.w) << 32) | w.z;
  RegionLoc L = region_of(R, g);
#pragma unroll 1
  for (int k = 0; k < nvalid; ++k) {
    const int64_t i = g + k;
    if (i >= L.end) L = region_of(R, i);
    reinterpret_cast<uint16_t*>(L.base)[i - L.start] = uint16_t(k < 4 ? lo >> (16 * k) : hi >> (16 * (k - 4)));
  }
  if (nvalid < 4) {
    lo &= nvalid ? (~uint64_t(0) >> (64 - 16 * nvalid)) : 0;
    hi = 0;
  } else if (nvalid < 8) {
    hi &= nvalid > 4 ? (~uint64_t(0) >> (64 - 16 * (nvalid - 4))) : 0;
  }
  return make_uint4(uint32_t(lo), uint32_t(lo >> 32), uint32_t(hi), uint32_t(hi >> 32));
}

// Tiles that span regions: a per-thread cursor over the region table keeps every group that lies inside one
// 16-byte-aligned region vectorized; only groups that straddle a boundary go element by element.
__device__ __forceinline__ uint4 load_group_cursor(const SzRegions& R, RegionLoc& cur, int64_t g, int64_t tend) {
  if (g < cur.start || g >= cur.end) cur = region_of(R, g);
  const uint16_t* p = reinterpret_cast<const uint16_t*>(cur.base) + (g - cur.start);
  if (g + kGroup <= cur.end && g + kGroup <= tend && (reinterpret_cast<uintptr_t>(p) & 15u) == 0)
    return __ldg(reinterpret_cast<const uint4*>(p));
  return load_group_slow(R, g, tend);
}

// Store 16 decoded elements at [g, g+16) (only the first nvalid); zeroes w0/w1 past nvalid (checksum).
__device__ __forceinline__ void store_group16_cursor(const SzRegions& R, RegionLoc& cur, int64_t g, int nvalid,
                                                     uint4& w0, uint4& w1) {
  if (g < cur.start || g >= cur.end) cur = region_of(R, g);
  uint16_t* p = reinterpret_cast<uint16_t*>(cur.base) + (g - cur.start);
  if (nvalid == 16 && g + 16 <= cur.end && (reinterpret_cast<uintptr_t>(p) & 15u) == 0) {
    reinterpret_cast<uint4*>(p)[0] = w0;
    reinterpret_cast<uint4*>(p)[1] = w1;
    return;
  }
  w0 = store_group_slow(R, g, nvalid < kGroup ? nvalid : kGroup, w0);
  w1 = nvalid > kGroup ? store_group_slow(R, g + kGroup, nvalid - kGroup, w1) : make_uint4(0u, 0u, 0u, 0u);
}

// Bytes [k, min(k+16, kend)) of the region table (FROM_REGIONS) or of lin, as one vector (zero past kend).
template <bool FROM_REGIONS>
__device__ __forceinline__ uint4 raw_gather_slow(const SzRegions& R, int esize, const uint8_t* lin, uint64_t k,
                                                 uint64_t kend) {
  uint64_t lo = 0, hi = 0;
  RegionLoc L = FROM_REGIONS ? region_of(R, int64_t(k / uint64_t(esize))) : RegionLoc{0, 0, 0};
#pragma unroll 1
  for (int b = 0; b < 16 && k + b < kend; ++b) {
    const uint64_t x = FROM_REGIONS ? *region_byte(R, esize, k + b, L) : lin[k + b];
    if (b < 8) lo |= x << (8 * b); else hi |= x << (8 * (b - 8));
  }
  return make_uint4(uint32_t(lo), uint32_t(lo >> 32), uint32_t(hi), uint32_t(hi >> 32));
}

// Bytes [k, min(k+16, kend)) of v into the region table (TO_REGIONS) or into lin.
template <bool TO_REGIONS>
__device__ __forceinline__ void raw_scatter_slow(const SzRegions& R, int esize, uint8_t* lin, uint64_t k,
                                                 uint64_t kend, uint4 v) {
  const uint64_t lo = (uint64_t(v.y) << 32) | v.x, hi = (uint64_t(v.w) << 32) | v.z;
  RegionLoc L = TO_REGIONS ? region_of(R, int64_t(k / uint64_t(esize))) : RegionLoc{0, 0, 0};
#pragma unroll 1
  for (int b = 0; b < 16 && k + b < kend; ++b) {
    const uint8_t x = uint8_t(b < 8 ? lo >> (8 * b) : hi >> (8 * (b - 8)));
    if (TO_REGIONS) *region_byte(R, esize, k + b, L) = x; else lin[k + b] = x;
  }
}

// ---- encode ------------------------------------------------------------------------------------------------------
struct EncCtl {  // 64 bytes at the start of the encode workspace, cleared before every encode
  unsigned int tile_counter;
  unsigned int sum_a;
  unsigned int sum_b;
  unsigned int pad[13];
};
static_assert(sizeof(EncCtl) == 64, "EncCtl is 64 bytes");

struct EncArgs {
  SzRegions src;
  uint8_t* body;  // out + 96
  EncCtl* ctl;
  uint64_t* state;
  uint8_t* exp_stage;
  uint64_t exp_cap;
  int64_t n;
  uint64_t n_chunks;
  uint64_t off_codes;
  uint64_t off_counts;
  uint64_t off_pos;
  int chunk_log2;
  int n_codes;
  uint8_t codebook[16];
  const unsigned int* gate;  // EXP2L fallback: run only once enc2l_finish_kernel set *gate; null: always
};

// One payload's EXP4 / RAW parts of an encode workspace (single encode: enc_work; batched: batch_work).
struct EncWork {
  EncCtl* ctl;         // cleared before the launch, with the look-back state
  uint64_t* state;     // EXP4 look-back state, one u64 per tile
  uint8_t* exp_stage;  // EXP4 exponent staging, exp_cap entries
  uint64_t exp_cap;
};

// enc_exp4_kernel arguments of one payload (gate null). `table`: the EXP4 table, kMaxCodes entries of which the
// first n_codes are exponents and the rest 0 (copied whole: a fixed trip count keeps the copy in registers).
SZ_HD EncArgs make_enc_args(const SzRegions& src, uint8_t* out, const EncWork& w, int chunk_log2, int n_codes,
                            const uint8_t* table) {
  EncArgs a{};
  a.src = src;
  a.body = out + kHeaderBytes;
  a.ctl = w.ctl;
  a.state = w.state;
  a.exp_stage = w.exp_stage;
  a.exp_cap = w.exp_cap;
  a.n = src.n;
  const Exp4Layout l0 = Exp4Layout::compute(uint64_t(src.n), chunk_log2, 0);
  a.n_chunks = l0.n_chunks;
  a.off_codes = l0.off_codes;
  a.off_counts = l0.off_counts;
  a.off_pos = l0.off_pos;
  a.chunk_log2 = chunk_log2;
  a.n_codes = n_codes;
  for (int i = 0; i < kMaxCodes; ++i) a.codebook[i] = table[i];
  return a;
}

// ---- encode tiles (EXP4 here, EXP2L in splitzip_cuda_exp2l_enc.cuh) ----------------------------------------------
// In-place exclusive scan of NQ (>= 32) shared counters by ONE warp; returns their total.
template <int NQ>
__device__ __forceinline__ uint32_t warp_excl_scan_smem(uint32_t* s) {
  constexpr int PER = NQ / 32;
  static_assert(NQ % 32 == 0, "NQ is a multiple of 32");
  const int lane = threadIdx.x & 31;
  uint32_t loc[PER], lsum = 0u;
#pragma unroll
  for (int k = 0; k < PER; ++k) lsum += (loc[k] = s[lane * PER + k]);
  const uint32_t incl = warp_incl_scan(lsum);
  const uint32_t total = __shfl_sync(kFull, incl, 31);
  uint32_t run = incl - lsum;
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    s[lane * PER + k] = run;
    run += loc[k];
  }
  __syncwarp();
  return total;
}

// Count of chunk j of a tile from the exclusive prefixes `off` of its NQ slots of 256 elements (`total` after the
// last): a chunk spans 2^spc_log2 whole slots.
template <int NQ>
__device__ __forceinline__ uint32_t chunk_count(const uint32_t* off, uint32_t total, int j, int spc_log2) {
  const int q0 = j << spc_log2, q1 = (j + 1) << spc_log2;
  return (q1 < NQ ? off[q1] : total) - off[q0];
}

// The source side of encode tile [ts, tend): tp = its first element; `fast` when the tile lies in one region and
// tp is 16-byte aligned; cur = a region cursor for tiles that span regions.
struct EncTileSrc {
  int64_t ts, tend;
  const uint16_t* tp;
  bool fast;
  RegionLoc cur;
};

__device__ __forceinline__ EncTileSrc enc_tile_src(const SzRegions& R, int64_t n, uint32_t tile, int64_t te) {
  EncTileSrc t;
  t.ts = int64_t(tile) * te;
  t.tend = t.ts + te < n ? t.ts + te : n;
  t.cur = region_of(R, t.ts);
  t.tp = reinterpret_cast<const uint16_t*>(t.cur.base) + (t.ts - t.cur.start);
  t.fast = t.cur.end >= t.tend && (reinterpret_cast<uintptr_t>(t.tp) & 15u) == 0;
  return t;
}

// Elements [g, g+8) of the tile; zero past tend.
__device__ __forceinline__ uint4 enc_load_group(const SzRegions& R, EncTileSrc& t, int64_t g) {
  if (g >= t.tend) return make_uint4(0u, 0u, 0u, 0u);
  if (t.fast && g + kGroup <= t.tend) return __ldg(reinterpret_cast<const uint4*>(t.tp + (g - t.ts)));
  return load_group_cursor(R, t.cur, g, t.tend);
}

// Elements of the tile passed in one read: NP passes of 2048 (8 elements per thread and pass, one 16-byte load),
// the loads of NB passes in flight together; f(p, g, v) for the group v at element g of pass p (every thread and
// pass, also past tend, where v is 0).
template <int NP, typename F>
__device__ __forceinline__ void enc_tile_passes(const SzRegions& R, EncTileSrc& t, F f) {
  constexpr int NB = NP < 4 ? NP : 4;
  const int tid = threadIdx.x;
#pragma unroll 1
  for (int p0 = 0; p0 < NP; p0 += NB) {
    uint4 v[NB];
#pragma unroll
    for (int j = 0; j < NB; ++j) v[j] = enc_load_group(R, t, t.ts + int64_t(p0 + j) * kPassElems + tid * kGroup);
#pragma unroll
    for (int j = 0; j < NB; ++j) f(p0 + j, t.ts + int64_t(p0 + j) * kPassElems + tid * kGroup, v[j]);
  }
}

// Escapes of one thread's group at element g of the tile (bits m8), by all 32 lanes of a warp whose first escape
// has index `first`: positions in their chunks -> pos[k], exponents (re-read from the source) -> exps[k].
__device__ __forceinline__ void enc_stage_escapes(const SzRegions& R, const EncTileSrc& t, int64_t g, uint32_t m8,
                                                  uint64_t first, int chunk_log2, uint16_t* pos, uint8_t* exps) {
  const uint32_t c = uint32_t(__popc(m8));
  uint64_t k = first + (warp_incl_scan(c) - c);
  const uint64_t cmask = (uint64_t(1) << chunk_log2) - 1;
  while (m8) {
    const int b = __ffs(m8) - 1;
    m8 &= m8 - 1u;
    const int64_t i = g + b;
    const uint32_t x = (t.fast && g + kGroup <= t.tend) ? uint32_t(__ldg(t.tp + (i - t.ts))) : load_elem16(R, i);
    pos[k] = uint16_t(uint64_t(i) & cmask);
    exps[k] = uint8_t((x >> 7) & 0xFFu);
    ++k;
  }
}

template <int NP>
struct Enc4Shared {
  static constexpr int kNQ = NP * kWarps;  // (pass, warp) slots of 256 elements, in element order
  uint8_t lut[256];                        // lut[e] = code of exponent e, or kLutEscape
  uint8_t mask[NP * kThreads];             // escape bits of each thread's 8 elements, per pass
  uint32_t off[kNQ];                       // escapes per slot, then their exclusive prefix in the tile
  uint32_t ck[2][kWarps];                  // per-warp checksum A, B
  uint32_t total;                          // escapes of the tile
  unsigned long long excl;                 // escapes of all earlier tiles (look-back)
};

// Phase A for the group of 8 elements at g of pass p (all threads): sm bytes, packed codes, escape bits and counts.
template <int NP>
__device__ __forceinline__ void enc_exp4_group(const EncArgs& a, Enc4Shared<NP>& sh, int p, int64_t g, int64_t tend,
                                               const uint4 v, uint32_t& ca, uint32_t& cb) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nvalid = g >= tend ? 0 : (g + kGroup <= tend ? kGroup : int(tend - g));
  uint32_t sm_lo, sm_hi, codes, m8;
  encode_group(v, sh.lut, sm_lo, sm_hi, codes, m8);
  if (nvalid < kGroup) {  // tail of the data: no escapes, zero nibbles past n
    m8 &= (1u << nvalid) - 1u;
    codes &= nvalid ? (0xFFFFFFFFu >> (32 - 4 * nvalid)) : 0u;
  }
  checksum_vec(v, uint32_t(uint64_t(g) * 2u), ca, cb);
  if (nvalid > 0) {
    *reinterpret_cast<uint2*>(a.body + g) = make_uint2(sm_lo, sm_hi);
    *reinterpret_cast<uint32_t*>(a.body + a.off_codes + uint64_t(g) / 2) = codes;
  }
  sh.mask[p * kThreads + tid] = uint8_t(m8);
  const uint32_t wc = warp_sum_u32(uint32_t(__popc(m8)));
  if (lane == 0) sh.off[p * kWarps + warp] = wc;
}

// Phase B (warp 0): slot prefixes, checksum, the tile's escape total published for the look-back and its
// exclusive prefix, the tile's chunk counts (one chunk spans 2^(chunk_log2-8) slots).
template <int NP>
__device__ __forceinline__ void enc_exp4_tile_counts(const EncArgs& a, Enc4Shared<NP>& sh, uint32_t tile,
                                                     int64_t ts) {
  constexpr int NQ = Enc4Shared<NP>::kNQ;
  const int lane = threadIdx.x & 31;
  const uint32_t total = warp_excl_scan_smem<NQ>(sh.off);
  const uint32_t xa = warp_sum_u32(lane < kWarps ? sh.ck[0][lane] : 0u);
  const uint32_t xb = warp_sum_u32(lane < kWarps ? sh.ck[1][lane] : 0u);
  if (lane == 0) {
    atomicAdd(&a.ctl->sum_a, xa);
    atomicAdd(&a.ctl->sum_b, xb);
    publish_aggregate(a.state, tile, total);
  }
  __syncwarp();
  const uint64_t excl = lookback_exclusive(a.state, tile, total);
  const int spc_log2 = a.chunk_log2 - 8;
  const uint64_t c = (uint64_t(ts) >> a.chunk_log2) + uint64_t(lane);
  if (lane < (NQ >> spc_log2) && c < a.n_chunks) {
    const uint32_t cnt = chunk_count<NQ>(sh.off, total, lane, spc_log2);
    *reinterpret_cast<uint16_t*>(a.body + a.off_counts + 2 * c) = uint16_t(cnt);
  }
  if (lane == 0) {
    sh.excl = excl;
    sh.total = total;
  }
}

// Phase C (all threads): escape positions into esc_pos, exponents into the staging area, unless the prefix alone
// proves the payload RAW.
template <int NP>
__device__ __forceinline__ void enc_exp4_flush(const EncArgs& a, const Enc4Shared<NP>& sh, const EncTileSrc& t) {
  constexpr int NQ = Enc4Shared<NP>::kNQ;
  const int tid = threadIdx.x, warp = tid >> 5;
  const uint64_t E = sh.excl;
  const uint32_t T = sh.total;
  if (T == 0) return;
  const uint64_t ET = E + T;
  // EXP4 needs align16(off_pos + 2M) + M < 2n with M >= E + T; otherwise the payload is RAW: skip escapes.
  if (!(align16(a.off_pos + 2 * ET) + ET < uint64_t(a.n) * 2u) || ET > a.exp_cap) return;
  uint16_t* pos = reinterpret_cast<uint16_t*>(a.body + a.off_pos);  // 16-byte aligned section
#pragma unroll 1
  for (int p = 0; p < NP; ++p) {
    const int q = p * kWarps + warp;
    if ((q + 1 < NQ ? sh.off[q + 1] : T) == sh.off[q]) continue;  // warp-uniform
    enc_stage_escapes(a.src, t, t.ts + int64_t(p) * kPassElems + tid * kGroup, sh.mask[p * kThreads + tid],
                      E + sh.off[q], a.chunk_log2, pos, a.exp_stage);
  }
}

// NP passes of 2048 elements per tile: tile = max(chunk, 8192) elements (exp4_encode_tile_elems), 4..32 chunks.
// One read of the input: sm bytes, codes and per-slot escape counts (A); the look-back (B); the escapes (C).
template <int NP>
__device__ __forceinline__ void enc_exp4_tile(const EncArgs& a, const uint32_t tile) {
  __shared__ Enc4Shared<NP> sh;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  {  // lut[e] = code of exponent e = tid, or escape (codebook entries are distinct)
    uint32_t code = kLutEscape;
#pragma unroll
    for (int j = 0; j < kMaxCodes; ++j)
      if (j < a.n_codes && uint32_t(a.codebook[j]) == uint32_t(tid)) code = uint32_t(j);
    sh.lut[tid] = uint8_t(code);
  }
  __syncthreads();
  EncTileSrc t = enc_tile_src(a.src, a.n, tile, int64_t(NP) * kPassElems);
  uint32_t ca = 0u, cb = 0u;
  enc_tile_passes<NP>(a.src, t, [&](int p, int64_t g, const uint4 v) {
    enc_exp4_group<NP>(a, sh, p, g, t.tend, v, ca, cb);
  });
  ca = warp_sum_u32(ca);
  cb = warp_sum_u32(cb);
  if (lane == 0) {
    sh.ck[0][warp] = ca;
    sh.ck[1][warp] = cb;
  }
  __syncthreads();
  if (warp == 0) enc_exp4_tile_counts<NP>(a, sh, tile, t.ts);
  __syncthreads();
  enc_exp4_flush<NP>(a, sh, t);
}

// One block per tile; tiles are numbered in the order their blocks start (atomic counter): look-back progress.
template <int NP>
__global__ void __launch_bounds__(kThreads) enc_exp4_kernel(const EncArgs a) {
  __shared__ uint32_t s_tile;
  if (a.gate != nullptr && vload(a.gate) == 0u) return;  // EXP2L was chosen
  if (threadIdx.x == 0) s_tile = atomicAdd(&a.ctl->tile_counter, 1u);
  __syncthreads();
  enc_exp4_tile<NP>(a, s_tile);
}

// f(std::integral_constant<int, NP>{}) with NP = the 2048-element passes of an encode tile of chunk_log2
// (exp4_encode_tile_elems): the template argument of enc_exp4_kernel, enc2l_kernel and enc_batch_kernel.
template <typename F>
static void with_enc_passes(int chunk_log2, F&& f) {
  switch (chunk_log2) {
    case 15: f(std::integral_constant<int, 16>{}); break;
    case 14: f(std::integral_constant<int, 8>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;  // chunk_log2 <= 13: 8192 elements
  }
}

// RAW tile copy between the region table and a linear buffer, optionally adding checksum terms.
// TO_LIN: regions -> lin (encode); else lin -> regions (decode). Tile = U * 4 KiB starting at byte tb0.
template <bool TO_LIN, bool SUM, int U>
__device__ __forceinline__ void raw_tile(const SzRegions& R, int esize, uint8_t* lin, uint64_t nbytes,
                                         uint64_t tb0, uint32_t& ca, uint32_t& cb) {
  constexpr uint64_t TB = uint64_t(U) * kThreads * 16;
  const int tid = threadIdx.x;
  const uint64_t es = uint64_t(esize);
  const uint64_t tb1 = tb0 + TB < nbytes ? tb0 + TB : nbytes;
  RegionLoc cur = region_of(R, int64_t(tb0 / es));
  uint8_t* rp = reinterpret_cast<uint8_t*>(cur.base) + (tb0 - uint64_t(cur.start) * es);
  const bool fast = uint64_t(cur.end) * es >= tb1 &&
                    ((reinterpret_cast<uintptr_t>(rp) | reinterpret_cast<uintptr_t>(lin + tb0)) & 15u) == 0;
  uint4 v[U];
  uint8_t* vp[U];  // region address of each vector, or nullptr: byte by byte
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const uint64_t k = tb0 + uint64_t(u * kThreads + tid) * 16;
    v[u] = make_uint4(0u, 0u, 0u, 0u);
    vp[u] = nullptr;
    if (k >= tb1) continue;
    if (fast) {
      if (k + 16 <= tb1) vp[u] = rp + (k - tb0);
    } else if (k + 16 <= tb1 && ((reinterpret_cast<uintptr_t>(lin + k)) & 15u) == 0) {
      const int64_t e = int64_t(k / es);
      if (e < cur.start || e >= cur.end) cur = region_of(R, e);
      uint8_t* q = reinterpret_cast<uint8_t*>(cur.base) + (k - uint64_t(cur.start) * es);
      if (k + 16 <= uint64_t(cur.end) * es && (reinterpret_cast<uintptr_t>(q) & 15u) == 0) vp[u] = q;
    }
    if (vp[u] != nullptr)
      v[u] = __ldg(reinterpret_cast<const uint4*>(TO_LIN ? vp[u] : lin + k));
    else
      v[u] = raw_gather_slow<TO_LIN>(R, esize, lin, k, tb1);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const uint64_t k = tb0 + uint64_t(u * kThreads + tid) * 16;
    if (k >= tb1) continue;
    if (vp[u] != nullptr)
      *reinterpret_cast<uint4*>(TO_LIN ? lin + k : vp[u]) = v[u];
    else
      raw_scatter_slow<!TO_LIN>(R, esize, lin, k, tb1, v[u]);
    if (SUM) checksum_vec(v[u], uint32_t(k), ca, cb);
  }
}

// Block-wide sum of (ca, cb) into two global counters (mod 2^32). All threads must call it.
__device__ __forceinline__ void block_checksum_add(uint32_t ca, uint32_t cb, unsigned int* ga, unsigned int* gb) {
  __shared__ uint32_t s_ck[2][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  ca = warp_sum_u32(ca);
  cb = warp_sum_u32(cb);
  if (lane == 0) {
    s_ck[0][warp] = ca;
    s_ck[1][warp] = cb;
  }
  __syncthreads();
  if (warp == 0) {
    const uint32_t xa = warp_sum_u32(lane < kWarps ? s_ck[0][lane] : 0u);
    const uint32_t xb = warp_sum_u32(lane < kWarps ? s_ck[1][lane] : 0u);
    if (lane == 0 && ga != nullptr) {
      atomicAdd(ga, xa);
      atomicAdd(gb, xb);
    }
  }
}

__global__ void __launch_bounds__(kThreads) enc_raw_kernel(const SzRegions src, int esize, uint8_t* body,
                                                           uint64_t nbytes, EncCtl* ctl) {
  uint32_t ca = 0u, cb = 0u;
  const uint64_t ntiles = (nbytes + kEncRawTileBytes - 1) / kEncRawTileBytes;
  for (uint64_t t = blockIdx.x; t < ntiles; t += gridDim.x)
    raw_tile<true, true, 4>(src, esize, body, nbytes, t * kEncRawTileBytes, ca, cb);
  block_checksum_add(ca, cb, &ctl->sum_a, &ctl->sum_b);
}

struct FinArgs {
  SzRegions src;
  uint8_t* out;
  const EncCtl* ctl;
  const uint64_t* state;
  const uint8_t* exp_stage;
  int64_t n;
  int dtype;
  int esize;
  int chunk_log2;
  int n_codes;
  uint32_t ntiles;  // EXP4 tiles of enc_exp4_kernel; 0 when the payload is RAW by construction
  int raw_copied;   // RAW by construction: the body is already written by enc_raw_kernel
  uint8_t codebook[16];
  uint64_t tag;      // transfer tag written into the header (FORMAT.md §6a)
  uint64_t* len_out;  // optional device word: the payload length (batched encode)
  const unsigned int* gate;  // EXP2L fallback: run only once enc2l_finish_kernel set *gate; null: always
};

// enc_finish_kernel / enc_finish_body arguments of one payload (`table`: as make_enc_args); ntiles, raw_copied,
// len_out and gate are left 0 for the caller.
SZ_HD FinArgs make_fin_args(const SzRegions& src, uint8_t* out, const EncWork& w, int dtype, int chunk_log2,
                            int n_codes, const uint8_t* table, uint64_t tag) {
  FinArgs f{};
  f.src = src;
  f.out = out;
  f.ctl = w.ctl;
  f.state = w.state;
  f.exp_stage = w.exp_stage;
  f.n = src.n;
  f.dtype = dtype;
  f.esize = dtype_elem_size(dtype);
  f.chunk_log2 = chunk_log2;
  f.n_codes = n_codes;
  f.tag = tag;
  for (int i = 0; i < kMaxCodes; ++i) f.codebook[i] = table[i];
  return f;
}

// Finish one payload with blocks [block, ..) of nblocks: header, gaps, staged exponents or the RAW fallback copy.
// Reads what other blocks of the same launch may have written (batched encode: the last tile's block runs it)
// through L2 (ld_relaxed / volatile / __ldcg), after the caller's fence.
__device__ __forceinline__ void enc_finish_body(const FinArgs& a, const uint32_t block, const uint32_t nblocks) {
  __shared__ uint32_t s_crc[256];
  const int tid = threadIdx.x;
  const uint64_t n = uint64_t(a.n);
  uint64_t m = 0;
  bool exp4 = false;
  Exp4Layout lay{};
  if (a.ntiles > 0) {
    m = ld_relaxed(a.state + (a.ntiles - 1)) & kValMask;  // inclusive prefix of the last tile = escape total
    lay = Exp4Layout::compute(n, a.chunk_log2, m);
    exp4 = lay.body_bytes < n * uint64_t(a.esize);
  }
  uint8_t* body = a.out + kHeaderBytes;
  if (block == 0) {
    s_crc[tid] = crc32_table_entry(uint32_t(tid));
    __syncthreads();
    if (tid == 0) {
      __align__(16) uint8_t hb[kHeaderBytes];
      pack_header(make_header(a.dtype, exp4 ? kModeExp4 : kModeRaw, a.n_codes, a.chunk_log2, a.codebook, n, m,
                              exp4 ? lay.body_bytes : n * uint64_t(a.esize), vload(&a.ctl->sum_a), vload(&a.ctl->sum_b),
                              a.tag),
                  hb, s_crc);
#pragma unroll
      for (int i = 0; i < kHeaderBytes / 16; ++i)
        reinterpret_cast<uint4*>(a.out)[i] = reinterpret_cast<const uint4*>(hb)[i];
      if (a.len_out) *a.len_out = uint64_t(kHeaderBytes) + (exp4 ? lay.body_bytes : n * uint64_t(a.esize));
      if (exp4) {  // zero gaps between sections (FORMAT.md §3)
        for (uint64_t k = n; k < lay.off_codes; ++k) body[k] = 0;
        for (uint64_t k = lay.off_codes + (n + 1) / 2; k < lay.off_counts; ++k) body[k] = 0;
        for (uint64_t k = lay.off_counts + 2 * lay.n_chunks; k < lay.off_pos; ++k) body[k] = 0;
        for (uint64_t k = lay.off_pos + 2 * m; k < lay.off_exp; ++k) body[k] = 0;
      }
    }
  }
  if (exp4) {
    for (uint64_t j = uint64_t(block) * kThreads + tid; j < m; j += uint64_t(nblocks) * kThreads)
      body[lay.off_exp + j] = __ldcg(a.exp_stage + j);
  } else if (!a.raw_copied && n > 0) {  // RAW fallback: EXP4 would not be smaller
    const uint64_t nbytes = n * uint64_t(a.esize);
    const uint64_t ntiles = (nbytes + kEncRawTileBytes - 1) / kEncRawTileBytes;
    uint32_t ca = 0u, cb = 0u;
    for (uint64_t t = block; t < ntiles; t += nblocks)
      raw_tile<true, false, 4>(a.src, a.esize, body, nbytes, t * kEncRawTileBytes, ca, cb);
  }
}

__global__ void __launch_bounds__(kThreads) enc_finish_kernel(const FinArgs a) {
  if (a.gate != nullptr && vload(a.gate) == 0u) return;  // EXP2L was chosen
  enc_finish_body(a, blockIdx.x, gridDim.x);
}

}  // namespace cudak
}  // namespace splitzip

#include "splitzip_cuda_exp2l_enc.cuh"  // EXP2L encode: tiles + mode choice, before the gated EXP4 / RAW kernels

namespace splitzip {
namespace cudak {

// ---- decode ------------------------------------------------------------------------------------------------------
struct DecCtl {  // 128 bytes at the start of the decode workspace, cleared before every decode
  unsigned int tile_counter;
  unsigned int done_counter;
  unsigned int sum_a;
  unsigned int sum_b;
  unsigned int ok;  // header valid and fits the destination
  unsigned int mode;
  unsigned int chunk_log2;
  unsigned int checksum_a;
  unsigned int checksum_b;
  unsigned int header_bytes;  // 64 (version 1) or 96 (version 2): the body starts there
  unsigned int pad[2];
  uint8_t table[16];
  uint64_t n, n_escapes, n_chunks, off_codes, off_counts, off_pos, off_exp, ntiles;
};
static_assert(sizeof(DecCtl) == 128, "DecCtl is 128 bytes");

// The section offsets and tile count of a validated header's layout (Exp4Layout or Exp2lLayout) into `ctl`.
template <typename Layout>
SZ_HD void set_dec_layout(DecCtl* ctl, const Layout& l) {
  ctl->n_chunks = l.n_chunks;
  ctl->off_codes = l.off_codes;
  ctl->off_counts = l.off_counts;
  ctl->off_pos = l.off_pos;
  ctl->off_exp = l.off_exp;
  const uint64_t te = cudafmt::exp4_decode_tile_elems(l.chunk_log2);
  ctl->ntiles = (l.n + te - 1) / te;
}

}  // namespace cudak
}  // namespace splitzip

#include "splitzip_cuda_exp2l_dec.cuh"  // EXP2L decode: check kernel (all validation first), write kernel

namespace splitzip {
namespace cudak {

__global__ void __launch_bounds__(kThreads) dec_header_kernel(const uint8_t* payload, uint64_t payload_len,
                                                              int dtype, int64_t n_dst, uint64_t expected_tag,
                                                              DecCtl* ctl, Dec2lCtl* c2, uint32_t* status) {
  __shared__ uint32_t s_crc[256];
  s_crc[threadIdx.x] = crc32_table_entry(threadIdx.x);
  __syncthreads();
  if (threadIdx.x != 0) return;
  uint8_t hb[kHeaderBytes];  // the first min(payload_len, 96) payload bytes (validation reads no more)
  const int avail = payload_len < uint64_t(kHeaderBytes) ? int(payload_len) : kHeaderBytes;
  for (int i = 0; i < avail; ++i) hb[i] = payload[i];
  Header h;
  int code = validate_header(hb, payload_len, expected_tag, &h, s_crc);
  if (code == SZ_OK) code = check_destination(h, dtype, uint64_t(n_dst));
  if (code == SZ_OK && h.mode == kModeExp2l && c2 == nullptr) code = SZ_ERR_MODE_UNSUPPORTED;  // bf16 has c2
  if (code == SZ_OK) {
    ctl->mode = h.mode;
    ctl->chunk_log2 = h.chunk_log2;
    ctl->checksum_a = h.checksum_a;
    ctl->checksum_b = h.checksum_b;
    ctl->header_bytes = uint32_t(header_bytes_of(h.version));
    for (int i = 0; i < 16; ++i) ctl->table[i] = h.codebook[i];  // zero past n_codes (validated)
    ctl->n = h.n_elems;
    ctl->n_escapes = h.n_escapes;
    if (h.mode == kModeExp4) {
      set_dec_layout(ctl, Exp4Layout::compute(h.n_elems, h.chunk_log2, h.n_escapes));
    } else if (h.mode == kModeExp2l) {
      dec2l_header(h, ctl, c2);
    }
    // no elements: the main kernel does not run, so check the (empty) data's checksum here
    if (h.n_elems == 0 && (h.checksum_a != 0u || h.checksum_b != 0u)) code = SZ_ERR_CHECKSUM;
    ctl->ok = 1u;
  }
  status[1] = 0u;
  status[2] = 0u;
  status[3] = 0u;
  status[0] = uint32_t(code);
}

struct DecArgs {
  const uint8_t* payload;
  SzRegions dst;
  DecCtl* ctl;
  uint64_t* state;
  uint32_t* status;
  int esize;
};

// Dense sections of one decode tile -> destination: NP passes of 4096 elements, 16 per thread (16-byte sm load +
// 8-byte code load -> two 16-byte stores), two passes in flight. FAST: the tile lies in one 16-byte-aligned
// region at dp; otherwise a region cursor (starting at L) vectorizes what it can. The sm / code reads of the
// tail group stay below off_counts <= body_bytes. `between` runs once, after the first loads are issued (the
// chunk counts of the tile are read there, overlapping the dense loads).
template <int NP, bool FAST, typename F>
__device__ __forceinline__ void dec_dense(const SzRegions& dst, const uint8_t* body, uint64_t off_codes,
                                          const uint8_t* s_table, int64_t ts, int64_t tend, uint16_t* dp,
                                          const RegionLoc L, uint32_t& ca, uint32_t& cb, F between) {
  constexpr int NB = 2;
  static_assert(NP >= 2 && NP % NB == 0, "decode tiles hold an even number of passes");
  const int tid = threadIdx.x;
  RegionLoc cur = L;
  const uint8_t* codes = body + off_codes;
#pragma unroll 1
  for (int p0 = 0; p0 < NP; p0 += NB) {
    uint4 smv[NB];
    uint2 cw[NB];
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      const int64_t g = ts + int64_t(p0 + j) * kDecPassElems + tid * 16;
      if (g < tend) {
        smv[j] = __ldg(reinterpret_cast<const uint4*>(body + g));
        cw[j] = __ldg(reinterpret_cast<const uint2*>(codes + uint64_t(g) / 2));
      } else {
        smv[j] = make_uint4(0u, 0u, 0u, 0u);
        cw[j] = make_uint2(0u, 0u);
      }
    }
    if (p0 == 0) between();
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      const int64_t g = ts + int64_t(p0 + j) * kDecPassElems + tid * 16;
      if (g >= tend) continue;
      uint4 w0 = decode_group(make_uint2(smv[j].x, smv[j].y), cw[j].x, s_table);
      uint4 w1 = decode_group(make_uint2(smv[j].z, smv[j].w), cw[j].y, s_table);
      if (FAST && g + 16 <= tend) {
        reinterpret_cast<uint4*>(dp + (g - ts))[0] = w0;
        reinterpret_cast<uint4*>(dp + (g - ts))[1] = w1;
      } else {  // elements past n stay out of the checksum
        store_group16_cursor(dst, cur, g, g + 16 <= tend ? 16 : int(tend - g), w0, w1);
      }
      checksum_vec(w0, uint32_t(uint64_t(g) * 2u), ca, cb);
      checksum_vec(w1, uint32_t(uint64_t(g) * 2u + 16u), ca, cb);
    }
  }
}

// Shared state of the EXP4 decode tiles of one block.
struct DecShared {
  uint32_t table32[4];   // the 16 codebook exponents (zero past n_codes)
  uint32_t cstart[64];   // escapes of the tile's chunks before chunk j (entries past the tile's chunks: T)
  uint32_t total;        // escapes of the tile (sum of its chunk counts, as read)
  uint32_t bad;          // a chunk count exceeds its chunk length
  unsigned long long excl;  // escapes of all earlier tiles (look-back)
};

// One decode tile: max(2^chunk_log2, 16384) elements = whole chunks (1..64 of them), NP passes of 4096.
template <int NP>
__device__ __forceinline__ void dec_exp4_tile(const DecArgs& a, const DecCtl& c, DecShared& sh, uint32_t tile,
                                              uint32_t& ca, uint32_t& cb) {
  constexpr int64_t TE = int64_t(NP) * kDecPassElems;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint8_t* body = a.payload + c.header_bytes;
  const int clog2 = int(c.chunk_log2);
  const uint64_t C = uint64_t(1) << clog2;
  const int64_t n = int64_t(c.n);
  const int64_t ts = int64_t(tile) * TE;
  const int64_t tend = ts + TE < n ? ts + TE : n;
  const uint64_t c0 = uint64_t(ts) >> clog2;
  const int nch = int(TE >> clog2);  // chunks per tile, 1..64
  const uint8_t* s_table = reinterpret_cast<const uint8_t*>(sh.table32);

  // 1. (warp 0, while the first dense loads are in flight) the tile's chunk counts, two adjacent chunks per
  //    lane, bounds-checked against the chunk lengths; their sum is published for the look-back right away
  uint32_t T = 0;
  auto counts = [&]() {
    if (warp != 0) return;
    uint32_t cnt[2] = {0u, 0u};
    bool bad = false;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = 2 * lane + h;
      if (j < nch && c0 + uint64_t(j) < c.n_chunks) {
        const uint64_t ch = c0 + uint64_t(j);
        cnt[h] = *reinterpret_cast<const uint16_t*>(body + c.off_counts + 2 * ch);
        const uint64_t rest = uint64_t(n) - (ch << clog2);
        bad |= uint64_t(cnt[h]) > (rest < C ? rest : C);
      }
    }
    const uint32_t pair = cnt[0] + cnt[1];
    const uint32_t incl = warp_incl_scan(pair);
    T = __shfl_sync(kFull, incl, 31);
    const bool anybad = __any_sync(kFull, bad);
    sh.cstart[2 * lane] = incl - pair;
    sh.cstart[2 * lane + 1] = incl - pair + cnt[0];
    if (lane == 0) {
      publish_aggregate(a.state, tile, T);
      sh.total = T;
      sh.bad = anybad ? 1u : 0u;
    }
  };

  // 2. dense sections -> destination
  const RegionLoc L = region_of(a.dst, ts);
  uint16_t* dp = reinterpret_cast<uint16_t*>(L.base) + (ts - L.start);
  const bool fast = L.end >= tend && (reinterpret_cast<uintptr_t>(dp) & 15u) == 0;
  if (fast) dec_dense<NP, true>(a.dst, body, c.off_codes, s_table, ts, tend, dp, L, ca, cb, counts);
  else dec_dense<NP, false>(a.dst, body, c.off_codes, s_table, ts, tend, dp, L, ca, cb, counts);

  // 3. first escape index of this tile
  if (warp == 0) {
    const uint64_t e = lookback_exclusive(a.state, tile, T);
    if (lane == 0) sh.excl = e;
  }
  __syncthreads();  // publishes sh.*, and orders the dense stores before the patches below
  const uint64_t E = sh.excl;
  const uint32_t TT = sh.total;
  const bool bad = sh.bad != 0u;
  const uint64_t M = c.n_escapes;
  if (tid == 0) {
    if (E + TT > M) record_error(a.status, SZ_ERR_ESC_SUM);
    if (uint64_t(tile) == c.ntiles - 1 && E + TT != M) {  // last tile: the total of all chunk counts
      record_error(a.status, SZ_ERR_ESC_SUM);
      a.status[1] = uint32_t(E + TT);
      a.status[2] = uint32_t((E + TT) >> 32);
    }
    if (bad) record_error(a.status, SZ_ERR_ESC_COUNT);
  }
  // escapes [E, E+TT) lie inside esc_pos / esc_exp only if E + TT <= n_escapes
  if (TT == 0 || E + TT > M || bad) return;

  // 4. patch: each position is checked (check_escape: inside its chunk, after the chunk's previous escape, so no
  //    element is patched twice) before the element is written
  for (uint32_t r = tid; r < TT; r += kThreads) {
    int j = 0;  // last chunk of the tile whose escapes start at or before r
#pragma unroll
    for (int step = 32; step > 0; step >>= 1)
      if (j + step < 64 && sh.cstart[j + step] <= r) j += step;
    const uint64_t ch = c0 + uint64_t(j);
    const uint64_t rest = uint64_t(n) - ch * C;
    const uint64_t clen = rest < C ? rest : C;
    const uint64_t k = E + r;
    const uint32_t pos = *reinterpret_cast<const uint16_t*>(body + c.off_pos + 2 * k);
    const uint32_t ex = body[c.off_exp + k];
    const bool first = r == sh.cstart[j];  // k - 1 >= E otherwise: inside this tile's escapes
    const uint32_t prev = first ? 0u : *reinterpret_cast<const uint16_t*>(body + c.off_pos + 2 * (k - 1));
    const int st = check_escape(pos, first, prev, clen);
    if (st != SZ_OK) {
      record_error(a.status, uint32_t(st));
      continue;
    }
    const uint64_t i = ch * C + pos;
    const uint32_t sm = body[i];
    const uint32_t cbyte = body[c.off_codes + (i >> 1)];
    const uint32_t code = (i & 1) ? (cbyte >> 4) : (cbyte & 0xFu);
    const uint32_t xd = combine(sm, s_table[code]);
    const uint32_t xn = combine(sm, ex);
    if (fast) dp[int64_t(i) - ts] = uint16_t(xn);
    else store_elem16(a.dst, int64_t(i), uint16_t(xn));
    cudabits::checksum_delta(i, xd, xn, ca, cb);
  }
}

// Persistent decode kernel: grid = SMs x occupancy; blocks take tiles from an atomic counter in increasing order
// (the next id is fetched while the current tile runs), so the look-back only ever waits on lower tiles that
// running blocks hold and process before anything higher. BF16: the payload may be EXP4 (tiles of
// max(chunk, 16384) elements) or RAW (tiles of RAW_U * 4 KiB); other dtypes can only be RAW.
template <bool BF16, int RAW_U>
__global__ void __launch_bounds__(kThreads) dec_main_kernel(const DecArgs a) {
  __shared__ uint32_t s_next[2];
  __shared__ DecShared sh;
  const DecCtl& c = *a.ctl;
  const bool ok = c.ok != 0u && c.mode != uint32_t(kModeExp2l);  // EXP2L: dec2l_check_kernel, dec2l_write_kernel
  uint32_t ca = 0u, cb = 0u;
  if (ok) {
    constexpr uint64_t kRawTile = uint64_t(RAW_U) * kThreads * 16;
    const bool raw = !BF16 || c.mode == uint32_t(kModeRaw);
    const uint64_t nbytes = c.n * uint64_t(a.esize);
    const uint64_t ntiles = raw ? (nbytes + kRawTile - 1) / kRawTile : c.ntiles;
    if (threadIdx.x < 4) sh.table32[threadIdx.x] = reinterpret_cast<const uint32_t*>(c.table)[threadIdx.x];
    if (threadIdx.x == 0) s_next[0] = atomicAdd(&a.ctl->tile_counter, 1u);
    __syncthreads();
    uint32_t tile = s_next[0];
    for (int it = 1; uint64_t(tile) < ntiles; ++it) {
      if (threadIdx.x == 0) s_next[it & 1] = atomicAdd(&a.ctl->tile_counter, 1u);  // prefetch the next id
      if (raw) {
        raw_tile<false, true, RAW_U>(a.dst, a.esize, const_cast<uint8_t*>(a.payload) + c.header_bytes, nbytes,
                                     uint64_t(tile) * kRawTile, ca, cb);
      } else {
        if constexpr (BF16) {
          if (c.chunk_log2 == 15) dec_exp4_tile<8>(a, c, sh, tile, ca, cb);  // 32768-element tiles
          else dec_exp4_tile<4>(a, c, sh, tile, ca, cb);                     // 16384-element tiles
        }
      }
      __syncthreads();  // s_next[it & 1] visible; sh free for the next tile
      tile = s_next[it & 1];
    }
  }
  block_checksum_add(ca, cb, ok ? &a.ctl->sum_a : nullptr, &a.ctl->sum_b);
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned prev = atomicAdd(&a.ctl->done_counter, 1u);
    if (prev == gridDim.x - 1 && ok) {  // last block: every block's checksum terms are in
      __threadfence();
      const uint32_t sa = atomicAdd(&a.ctl->sum_a, 0u);
      const uint32_t sb = atomicAdd(&a.ctl->sum_b, 0u);
      if (sa != c.checksum_a || sb != c.checksum_b) record_error(a.status, SZ_ERR_CHECKSUM);
    }
  }
}

// ---- host side -----------------------------------------------------------------------------------------------------
// Device queries are cached per device (they are host-side and never synchronize; warm them up once outside a
// CUDA-graph capture). The CPU emulation does not cache, so tests can change the emulated GPU.
#if defined(SPLITZIP_CUDA_EMU)
constexpr bool kCacheQueries = false;
#else
constexpr bool kCacheQueries = true;
#endif

static int current_device() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
  return dev;
}

static int sm_count() {
  static std::atomic<int> cache[64];
  const int dev = current_device();
  if (kCacheQueries && cache[dev].load(std::memory_order_relaxed) > 0) return cache[dev].load();
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || v <= 0) v = 132;
  cache[dev].store(v);
  return v;
}

static bool regions_ok(const SzRegions* r) {
  if (r == nullptr || r->n < 0) return false;
  if (r->n == 0) return true;
  if (r->ptrs == nullptr) return r->count == 1 && r->ptr0 != 0;
  if (r->count < 1) return false;
  if (r->prefix == nullptr) return r->uniform > 0 && r->uniform * r->count == r->n;
  return true;
}

// Encode workspace: [EncCtl][EXP4 look-back state][Enc2lCtl][EXP2L look-back states] (cleared by one memset),
// then [EXP4 exponent staging][EXP2L chunk escape counts][EXP2L escape positions][EXP2L escape exponents]. The
// EXP2L parts exist only for a two-level codebook (FORMAT.md §5) whose EXP2L payload could beat RAW.
struct EncPlan {
  bool exp4;             // EXP4 tiles (the EXP4 pass; behind an EXP2L attempt it runs only if EXP2L loses)
  uint64_t ntiles;       // EXP4 tiles
  uint64_t state_bytes;  // EXP4 look-back state
  uint64_t exp_cap;      // EXP4 escape staging capacity
  bool exp2l;            // an EXP2L attempt first
  uint64_t ntiles2;      // EXP2L tiles (same tile length as EXP4)
  uint64_t off2_ctl;     // Enc2lCtl; the sec / esc look-back states follow, state2_bytes each
  uint64_t state2_bytes;
  uint64_t clear_bytes;  // cleared before every encode
  uint64_t off_stage;    // EXP4 exponent staging
  uint64_t off2_cnt, off2_pos, off2_exp, cap2;  // EXP2L staging
  size_t ws_bytes;
};

static EncPlan enc_plan(int64_t n, int dtype, bool codebook_given, bool two_level, int chunk_log2) {
  EncPlan p{};
  const uint64_t un = n > 0 ? uint64_t(n) : 0;
  const bool coded = codebook_given && dtype_exp4_allowed(dtype) && un > 0 && chunk_log2 >= kMinChunkLog2 &&
                     chunk_log2 <= kMaxChunkLog2;
  p.exp4 = coded && Exp4Layout::compute(un, chunk_log2, 0).body_bytes < un * 2;
  p.exp2l = coded && two_level && cudafmt::exp2l_can_beat_raw(un, chunk_log2);
  const uint64_t te = coded ? cudafmt::exp4_encode_tile_elems(chunk_log2) : 1;  // chunk_log2 checked when coded
  if (p.exp4) {
    p.ntiles = (un + te - 1) / te;
    p.state_bytes = align16(p.ntiles * 8);
    p.exp_cap = cudafmt::exp4_escape_stage_cap(un, chunk_log2);
  }
  uint64_t off = sizeof(EncCtl) + p.state_bytes;
  if (p.exp2l) {
    p.ntiles2 = (un + te - 1) / te;
    p.off2_ctl = off;
    p.state2_bytes = align16(p.ntiles2 * 8);
    off += sizeof(Enc2lCtl) + 2 * p.state2_bytes;
  }
  p.clear_bytes = off;
  p.off_stage = off;
  off += align16(p.exp_cap);
  if (p.exp2l) {
    p.cap2 = cudafmt::exp2l_escape_stage_cap(un, chunk_log2);
    p.off2_cnt = off;
    off += align16(2 * ((un + (uint64_t(1) << chunk_log2) - 1) >> chunk_log2));
    p.off2_pos = off;
    off += align16(2 * p.cap2);
    p.off2_exp = off;
    off += align16(p.cap2);
  }
  p.ws_bytes = size_t(off);
  return p;
}

// Resident blocks per SM of a kernel (cached per device; host-side query, no synchronization).
template <typename K>
static int blocks_per_sm(K kernel, int slot) {
  static std::atomic<int> cache[4][64];
  const int dev = current_device();
  if (kCacheQueries && cache[slot][dev].load(std::memory_order_relaxed) > 0) return cache[slot][dev].load();
  int nb = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kernel, kThreads, 0) != cudaSuccess || nb <= 0) nb = 4;
  cache[slot][dev].store(nb);
  return nb;
}

static int launch_result(cudaError_t e) { return e == cudaSuccess ? SZ_LAUNCH_OK : int(e); }

// Encode codebook arguments: 0..22 distinct exponents, most frequent first (host memory; EXP4 takes the first
// min(16, n_codes), EXP2L all of them, FORMAT.md §5), chunk_log2 in range when any is given.
static bool codebook_ok(const uint8_t* codebook, int n_codes, int chunk_log2) {
  if (n_codes < 0 || n_codes > kMaxCodebook || (n_codes > 0 && codebook == nullptr)) return false;
  if (n_codes > 0 && (chunk_log2 < kMinChunkLog2 || chunk_log2 > kMaxChunkLog2)) return false;
  for (int i = 0; i < n_codes; ++i)
    for (int j = 0; j < i; ++j)
      if (codebook[i] == codebook[j]) return false;
  return true;
}

// The EXP2L parts of the encode workspace (EncPlan).
static Enc2lWorkspace enc2l_workspace(uint8_t* ws, const EncPlan& p) {
  Enc2lWorkspace w{};
  w.ctl = reinterpret_cast<Enc2lCtl*>(ws + p.off2_ctl);
  w.state_sec = reinterpret_cast<uint64_t*>(ws + p.off2_ctl + sizeof(Enc2lCtl));
  w.state_esc = reinterpret_cast<uint64_t*>(ws + p.off2_ctl + sizeof(Enc2lCtl) + p.state2_bytes);
  w.stage_cnt = reinterpret_cast<uint16_t*>(ws + p.off2_cnt);
  w.stage_pos = reinterpret_cast<uint16_t*>(ws + p.off2_pos);
  w.stage_exp = ws + p.off2_exp;
  w.stage_cap = p.cap2;
  w.ntiles = uint32_t(p.ntiles2);
  return w;
}

// The EXP4 / RAW parts of the encode workspace (EncPlan).
static EncWork enc_work(uint8_t* ws, const EncPlan& p) {
  return EncWork{reinterpret_cast<EncCtl*>(ws), reinterpret_cast<uint64_t*>(ws + sizeof(EncCtl)), ws + p.off_stage,
                 p.exp_cap};
}

// The EXP4 pass (table4: make_enc_args) over ntiles tiles, behind `gate` when it is the EXP2L fallback.
static void launch_exp4(const SzRegions* src, const uint8_t* table4, int n4, int chunk_log2, uint8_t* out,
                        const EncWork& w, uint64_t ntiles, const unsigned int* gate, cudaStream_t stream) {
  (void)stream;  // unused by the CPU emulation's launches
  EncArgs a = make_enc_args(*src, out, w, chunk_log2, n4, table4);
  a.gate = gate;
  const dim3 grid(static_cast<unsigned>(ntiles));
  with_enc_passes(chunk_log2, [&](auto np) { SZ_LAUNCH(enc_exp4_kernel<decltype(np)::value>, grid, stream, a); });
}

}  // namespace cudak
}  // namespace splitzip

using namespace splitzip;
using namespace splitzip::cudak;

extern "C" {

size_t splitzip_cuda_encode_workspace_bytes(int64_t n_elems, int dtype, int codebook_given, int two_level,
                                            int chunk_log2) {
  return enc_plan(n_elems, dtype, codebook_given != 0, two_level != 0, chunk_log2).ws_bytes;
}

int splitzip_cuda_encode(const SzRegions* src, int dtype, const uint8_t* codebook, int n_codes, int two_level,
                         int chunk_log2, uint64_t tag, uint8_t* out, uint64_t out_capacity, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream) {
  const int esize = dtype_elem_size(dtype);
  if (esize == 0 || !regions_ok(src) || out == nullptr || workspace == nullptr) return SZ_LAUNCH_BAD_ARG;
  if (!codebook_ok(codebook, n_codes, chunk_log2)) return SZ_LAUNCH_BAD_ARG;
  const int64_t n = src->n;
  if (out_capacity < encode_capacity(uint64_t(n), uint64_t(esize))) return SZ_LAUNCH_SMALL_BUFFER;
  if ((reinterpret_cast<uintptr_t>(out) & 15u) != 0 || (reinterpret_cast<uintptr_t>(workspace) & 15u) != 0)
    return SZ_LAUNCH_MISALIGNED;
  const EncPlan plan = enc_plan(n, dtype, n_codes > 0, two_level != 0, chunk_log2);
  if (workspace_bytes < plan.ws_bytes) return SZ_LAUNCH_SMALL_WORKSPACE;
  if (plan.ntiles > 0x7FFFFFFFull || plan.ntiles2 > 0x7FFFFFFFull) return SZ_LAUNCH_BAD_ARG;

  auto* ws = static_cast<uint8_t*>(workspace);
  cudaError_t e = cudaMemsetAsync(ws, 0, size_t(plan.clear_bytes), stream);
  if (e != cudaSuccess) return launch_result(e);

  const uint64_t un = uint64_t(n);
  const uint64_t raw_tiles = (un * uint64_t(esize) + kEncRawTileBytes - 1) / kEncRawTileBytes;
  const uint64_t raw_grid_cap = uint64_t(sm_count()) * 8;
  unsigned fin_grid = unsigned(raw_tiles < raw_grid_cap ? raw_tiles : raw_grid_cap);
  if (fin_grid == 0) fin_grid = 1;
  const int n4 = n_codes < kMaxCodes ? n_codes : kMaxCodes;  // the EXP4 table (FORMAT.md §5), zero-filled
  uint8_t table4[kMaxCodes] = {};
  for (int i = 0; i < n4; ++i) table4[i] = codebook[i];
  const unsigned int* gate = nullptr;
  const EncWork w4 = enc_work(ws, plan);
  FinArgs f = make_fin_args(*src, out, w4, dtype, chunk_log2, n4, table4, tag);
  if (plan.exp2l) {  // EXP2L first; the kernels below run only if it loses
    const Enc2lWorkspace w = enc2l_workspace(ws, plan);
    launch_exp2l(src, codebook, n_codes, chunk_log2, tag, out, w, fin_grid, stream);
    gate = &w.ctl->gate;
    if (!plan.exp4) f.ctl = &w.ctl->base;  // RAW fallback: the EXP2L pass's checksum
  }
  f.gate = gate;
  if (plan.exp4) {
    launch_exp4(src, table4, n4, chunk_log2, out, w4, plan.ntiles, gate, stream);
    f.ntiles = uint32_t(plan.ntiles);
    f.raw_copied = 0;
  } else if (plan.exp2l) {  // RAW fallback of the EXP2L attempt: the finish kernel copies the input
    f.ntiles = 0;
    f.raw_copied = 0;
  } else {
    if (n > 0) {
      const unsigned g = unsigned(raw_tiles < raw_grid_cap ? raw_tiles : raw_grid_cap);
      SZ_LAUNCH(enc_raw_kernel, g, stream, *src, esize, out + kHeaderBytes, un * uint64_t(esize), w4.ctl);
    }
    f.ntiles = 0;
    f.raw_copied = 1;
    fin_grid = 1;
  }
  SZ_LAUNCH(enc_finish_kernel, fin_grid, stream, f);
  return launch_result(cudaGetLastError());
}

// Decode workspace: [DecCtl][look-back state], and for bf16 (EXP2L possible) [Dec2lCtl][second look-back state]
// [per-tile prefixes (2 x u64)]; all but the prefixes are cleared before every decode. One state slot per 32 KiB
// of output bounds the EXP4 and EXP2L tiles (>= 16384 bf16 elements each).
size_t splitzip_cuda_decode_workspace_bytes(int64_t n_elems, int dtype) {
  const uint64_t es = uint64_t(dtype_elem_size(dtype));
  const uint64_t nbytes = n_elems > 0 ? uint64_t(n_elems) * es : 0;
  const uint64_t grid = (nbytes + kDecTileBytes - 1) / kDecTileBytes;
  const uint64_t exp2l = dtype == kDtypeBFloat16 ? sizeof(Dec2lCtl) + align16(grid * 8) + align16(grid * 16) : 0;
  return size_t(sizeof(DecCtl) + align16(grid * 8) + exp2l);
}

int splitzip_cuda_decode(const uint8_t* payload, uint64_t payload_len, const SzRegions* dst, int dtype,
                         uint64_t expected_tag, uint32_t* status, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
  const int esize = dtype_elem_size(dtype);
  if (esize == 0 || !regions_ok(dst) || payload == nullptr || status == nullptr || workspace == nullptr)
    return SZ_LAUNCH_BAD_ARG;
  if ((reinterpret_cast<uintptr_t>(payload) & 15u) != 0 || (reinterpret_cast<uintptr_t>(workspace) & 15u) != 0 ||
      (reinterpret_cast<uintptr_t>(status) & 3u) != 0)
    return SZ_LAUNCH_MISALIGNED;
  if (workspace_bytes < splitzip_cuda_decode_workspace_bytes(dst->n, dtype)) return SZ_LAUNCH_SMALL_WORKSPACE;
  const uint64_t nbytes = uint64_t(dst->n) * uint64_t(esize);
  const uint64_t state_tiles = (nbytes + kDecTileBytes - 1) / kDecTileBytes;  // >= EXP4 / EXP2L tiles
  if (state_tiles > 0x3FFFFFFFull) return SZ_LAUNCH_BAD_ARG;
  const bool bf16 = dtype == kDtypeBFloat16;
  auto* ws = static_cast<uint8_t*>(workspace);
  auto* ctl = reinterpret_cast<DecCtl*>(ws);
  auto* state = reinterpret_cast<uint64_t*>(ws + sizeof(DecCtl));
  uint8_t* ws2 = ws + sizeof(DecCtl) + align16(state_tiles * 8);  // bf16: Dec2lCtl, state, prefixes
  auto* c2 = bf16 ? reinterpret_cast<Dec2lCtl*>(ws2) : nullptr;
  const uint64_t clear = uint64_t(ws2 - ws) + (bf16 ? sizeof(Dec2lCtl) + align16(state_tiles * 8) : 0);
  cudaError_t e = cudaMemsetAsync(ws, 0, size_t(clear), stream);
  if (e != cudaSuccess) return launch_result(e);
  SZ_LAUNCH(dec_header_kernel, 1u, stream, payload, payload_len, dtype, dst->n, expected_tag, ctl, c2, status);
  if (nbytes > 0 && bf16) {  // EXP2L payloads (the kernels exit at once for other modes)
    Dec2lArgs d{};
    d.payload = payload;
    d.dst = *dst;
    d.ctl = ctl;
    d.c2 = c2;
    d.state_sec = reinterpret_cast<uint64_t*>(ws2 + sizeof(Dec2lCtl));
    d.state_esc = state;
    d.excl = reinterpret_cast<uint64_t*>(ws2 + sizeof(Dec2lCtl) + align16(state_tiles * 8));
    d.status = status;
    SZ_LAUNCH(dec2l_check_kernel, unsigned(state_tiles), stream, d);
    SZ_LAUNCH(dec2l_write_kernel, unsigned(state_tiles), stream, d);
  }
  if (nbytes > 0) {
    DecArgs a{};
    a.payload = payload;
    a.dst = *dst;
    a.ctl = ctl;
    a.state = state;
    a.status = status;
    a.esize = esize;
    const uint64_t raw_tile_bytes = uint64_t(bf16 ? kDecRawUBf16 : kDecRawUOther) * kThreads * 16;
    const uint64_t max_tiles = (nbytes + raw_tile_bytes - 1) / raw_tile_bytes;  // >= EXP4 tiles too
    const uint64_t resident = uint64_t(sm_count()) *
        uint64_t(bf16 ? blocks_per_sm(dec_main_kernel<true, kDecRawUBf16>, 0)
                      : blocks_per_sm(dec_main_kernel<false, kDecRawUOther>, 1));
    const unsigned grid = unsigned(max_tiles < resident ? max_tiles : resident);
    if (bf16) {
      auto* k = &dec_main_kernel<true, kDecRawUBf16>;
      SZ_LAUNCH(k, grid, stream, a);
    } else {
      auto* k = &dec_main_kernel<false, kDecRawUOther>;
      SZ_LAUNCH(k, grid, stream, a);
    }
  }
  return launch_result(cudaGetLastError());
}

}  // extern "C"

#include "splitzip_cuda_batch.cuh"  // batched encode: one launch for all payloads of a request
