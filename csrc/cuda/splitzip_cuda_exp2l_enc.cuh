// EXP2L encode of the CUDA codec (FORMAT.md §3a, mode choice §5). Included by splitzip_cuda.cu after its EXP4
// encode kernels (it uses their tile helpers enc_tile_src, enc_tile_passes and enc_stage_escapes, the region
// helpers, look-back and EncCtl).
//
// One read of the input, like EXP4: tiles of max(2^chunk_log2, 8192) elements (whole chunks, NP passes of 2048),
// one 256-thread block each, numbered in start order (atomic counter) for a decoupled look-back.
//   A. per pass: sm bytes, the three bit planes of the primary codes (the 8 lanes of a 64-element block gather
//      their plane bytes with shuffles and store the block's 24 bytes as six u32 words, so a warp writes 96
//      contiguous bytes), checksum terms. Every thread keeps its marker / escape bits and its markers' secondary
//      codes (packed nibbles, element order) in shared memory, every (pass, warp) slot its marker / escape counts.
//   B. warp 0 scans the slot counts (in element order), writes the tile's sec_counts (their offset depends on n
//      only), stages the per-chunk escape counts, and publishes TWO tile aggregates -- secondary bytes and escapes
//      -- for two look-backs (two state arrays: each sum may reach ~n, too wide to pack both into one 62-bit word).
//   C. every thread ORs its nibbles into a shared copy of the tile's sec bytes at (its chunk's nibble offset in the
//      tile + its rank in the chunk); chunks start on whole bytes, so no byte is shared with another tile.
//   D. with the exclusive prefixes: the sec bytes go to off_sec + prefix (off_sec depends on n only); escape
//      positions / exponents and the chunk escape counts go to workspace staging (their offsets depend on
//      sec_bytes). A tile whose prefixes alone prove EXP2L >= RAW writes neither (bounds both writes, like EXP4).
// enc2l_finish_kernel picks the mode (FORMAT.md §5): EXP2L iff b_2l < min(b_exp4, b_raw), b_exp4 from the EXP4
// escape count that the tiles also counted. It writes the header (format.h make_exp2l_header / pack_header), the
// gaps and the staged sections; otherwise it opens the gate of the EXP4 / RAW kernels queued behind it, so the
// host never waits for the decision.
#pragma once

namespace splitzip {
namespace cudak {

struct Enc2lCtl {             // 128 bytes of the encode workspace, cleared before every encode
  EncCtl base;                // tile counter and checksum of the EXP2L pass (the RAW fallback's header uses them)
  unsigned long long m4;      // EXP4 escapes of the data (b_exp4 of FORMAT.md §5)
  unsigned int gate;          // set by enc2l_finish_kernel when EXP2L is not chosen: the EXP4 / RAW kernels run
  unsigned int pad[13];
};
static_assert(sizeof(Enc2lCtl) == 128, "Enc2lCtl is 128 bytes");

struct Enc2lWorkspace {  // the EXP2L parts of an encode workspace (splitzip_cuda.cu EncPlan, enc2l_workspace)
  Enc2lCtl* ctl;         // cleared before the launch, with the look-back states
  uint64_t* state_sec;   // look-back: secondary bytes per tile
  uint64_t* state_esc;   // look-back: escapes per tile
  uint16_t* stage_cnt;   // escapes per chunk
  uint16_t* stage_pos;   // escape positions in payload order (stage_cap entries)
  uint8_t* stage_exp;    // escape exponents
  uint64_t stage_cap;    // cudafmt::exp2l_escape_stage_cap
  uint32_t ntiles;
};

struct Enc2lArgs {
  SzRegions src;
  uint8_t* body;          // out + 96
  Enc2lWorkspace w;
  int64_t n;
  uint64_t n_chunks;
  uint64_t off_codes;
  uint64_t off_scounts;
  uint64_t off_sec;
  int chunk_log2;
  uint32_t t4;            // exp2l_exp4_sec_threshold(n_codes)
  uint8_t lut[256];       // exp2l_encode_lut (format.h)
};

// 8 elements (w[q] = element 2q | element 2q+1 << 16) through the EXP2L table; elements k >= nvalid lie past n:
// primary code 0, no marker, no escape (FORMAT.md §3a: codes past n are 0).
struct Exp2lGroup {
  uint32_t sm_lo, sm_hi;  // sm bytes of elements 0..3 / 4..7
  uint32_t planes;        // byte k: bit k of the 8 primary codes (element j in bit j): the plane bytes
  uint32_t sec;           // the markers' secondary codes as nibbles in element order, the first in bits 0..3
  uint32_t mk, es;        // marker / escape bits (bit j = element j)
  uint32_t m4;            // how many of the 8 are EXP4 escapes
};
SZ_HD Exp2lGroup exp2l_encode8(const uint32_t w[4], int nvalid, const uint8_t* lut, uint32_t t4) {
  Exp2lGroup o{};
  uint32_t smp[4];
  SZ_UNROLL for (int q = 0; q < 4; ++q) smp[q] = (w[q] & 0x007F007Fu) | ((w[q] >> 8) & 0x00800080u);
  o.sm_lo = cudabits::prmt(smp[0], smp[1], 0x6420);
  o.sm_hi = cudabits::prmt(smp[2], smp[3], 0x6420);
  int nm = 0;
  SZ_UNROLL for (int k = 0; k < 8; ++k) {
    const uint32_t l = k < nvalid ? uint32_t(lut[(w[k >> 1] >> (16 * (k & 1) + 7)) & 0xFFu]) : 0u;
    o.planes |= ((l & 1u) << k) | (((l >> 1) & 1u) << (8 + k)) | (((l >> 2) & 1u) << (16 + k));
    if (l & kExp2lLutMarker) {
      const uint32_t s = (l >> 3) & 15u;
      o.mk |= 1u << k;
      o.es |= (s == uint32_t(kExp2lSecEscape) ? 1u : 0u) << k;
      o.m4 += s >= t4 ? 1u : 0u;
      o.sec |= s << (4 * nm);
      ++nm;
    }
  }
  return o;
}

// Lanes 8G..8G+7 hold the plane bytes of 64-element block G (`planes` byte k = plane k's byte of the lane's 8
// elements). Lane 8G+q, q < 6, returns word q of the block's 24 code bytes: plane q>>1, bytes of lanes 4(q&1)..+3.
// All 32 lanes must call it.
__device__ __forceinline__ uint32_t exp2l_plane_word(uint32_t planes) {
  const int lane = threadIdx.x & 31, q = lane & 7;
  const int src = (lane & ~7) + 4 * (q & 1), shift = 8 * (q >> 1);
  uint32_t w = 0u;
#pragma unroll
  for (int i = 0; i < 4; ++i) w |= ((__shfl_sync(kFull, planes, src + i) >> shift) & 0xFFu) << (8 * i);
  return w;
}

template <int NP>
struct Enc2lShared {
  static constexpr int kNQ = NP * kWarps;                               // (pass, warp) slots of 256 elements
  static constexpr int kSecWords = (NP * kPassElems + 32) / 8 + 1;      // markers + a pad per chunk (<= 32), +1
  uint8_t lut[256];
  uint16_t bits[NP * kThreads];   // marker bits | escape bits << 8, per pass and thread
  uint32_t sec[NP * kThreads];    // the thread's secondary nibbles, per pass
  uint32_t secw[kSecWords];       // the tile's sec bytes (nibble r of the tile in bits 4(r%8) of word r/8)
  uint32_t moff[kNQ];             // markers per slot, then their exclusive prefix in the tile
  uint32_t eoff[kNQ];             // escapes per slot, then their exclusive prefix
  uint32_t cnib[32];              // nibble offset of chunk j's codes in secw
  uint32_t red[3][kWarps];        // per-warp checksum A, B and EXP4 escapes
  uint32_t tm, tsec, tesc;        // markers, sec bytes, escapes of the tile
  unsigned long long esec, eesc;  // sec bytes / escapes of all earlier tiles
};
static_assert(sizeof(Enc2lShared<16>) <= 44 * 1024, "EXP2L encode tile fits in static shared memory");

// Phase A for the group of 8 elements at g of pass p (all threads; shuffles inside).
template <int NP>
__device__ __forceinline__ void enc2l_group(const Enc2lArgs& a, Enc2lShared<NP>& sh, int p, int64_t g, int64_t tend,
                                            const uint4 v, uint32_t& ca, uint32_t& cb, uint32_t& m4) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nvalid = g >= tend ? 0 : (g + kGroup <= tend ? kGroup : int(tend - g));
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  const Exp2lGroup o = exp2l_encode8(w, nvalid, sh.lut, a.t4);
  checksum_vec(v, uint32_t(uint64_t(g) * 2u), ca, cb);
  if (nvalid > 0) *reinterpret_cast<uint2*>(a.body + g) = make_uint2(o.sm_lo, o.sm_hi);
  const uint32_t pw = exp2l_plane_word(o.planes);
  const int64_t blk = g & ~int64_t(63);  // first element of the lane's 64-element block
  if ((lane & 7) < 6 && blk < tend)
    *reinterpret_cast<uint32_t*>(a.body + a.off_codes + 3 * uint64_t(blk) / 8 + 4 * (lane & 7)) = pw;
  sh.bits[p * kThreads + tid] = uint16_t(o.mk | (o.es << 8));
  sh.sec[p * kThreads + tid] = o.sec;
  m4 += o.m4;
  const uint32_t wm = warp_sum_u32(uint32_t(__popc(o.mk))), we = warp_sum_u32(uint32_t(__popc(o.es)));
  if (lane == 0) {
    sh.moff[p * kWarps + warp] = wm;
    sh.eoff[p * kWarps + warp] = we;
  }
}

// Phase B (warp 0): slot prefixes, sec_counts, staged escape counts, checksum, the two tile aggregates.
template <int NP>
__device__ __forceinline__ void enc2l_tile_counts(const Enc2lArgs& a, Enc2lShared<NP>& sh, uint32_t tile,
                                                  int64_t ts) {
  constexpr int NQ = Enc2lShared<NP>::kNQ;
  const int lane = threadIdx.x & 31;
  const uint32_t tm = warp_excl_scan_smem<NQ>(sh.moff);
  const uint32_t te = warp_excl_scan_smem<NQ>(sh.eoff);
  const int spc_log2 = a.chunk_log2 - 8;  // slots per chunk: chunks are whole slots (chunk_log2 >= 8)
  const uint64_t c = (uint64_t(ts) >> a.chunk_log2) + uint64_t(lane);
  uint32_t bytes = 0u;
  if (lane < (NQ >> spc_log2) && c < a.n_chunks) {
    const uint32_t cnt = chunk_count<NQ>(sh.moff, tm, lane, spc_log2);
    *reinterpret_cast<uint16_t*>(a.body + a.off_scounts + 2 * c) = uint16_t(cnt);
    a.w.stage_cnt[c] = uint16_t(chunk_count<NQ>(sh.eoff, te, lane, spc_log2));
    bytes = (cnt + 1u) / 2u;
  }
  const uint32_t incl = warp_incl_scan(bytes);
  const uint32_t tsec = __shfl_sync(kFull, incl, 31);
  sh.cnib[lane] = 2u * (incl - bytes);
  const uint32_t xa = warp_sum_u32(lane < kWarps ? sh.red[0][lane] : 0u);
  const uint32_t xb = warp_sum_u32(lane < kWarps ? sh.red[1][lane] : 0u);
  const uint32_t xm = warp_sum_u32(lane < kWarps ? sh.red[2][lane] : 0u);
  if (lane == 0) {
    atomicAdd(&a.w.ctl->base.sum_a, xa);  // mod 2^32 and order-free: deterministic
    atomicAdd(&a.w.ctl->base.sum_b, xb);
    atomicAdd(&a.w.ctl->m4, static_cast<unsigned long long>(xm));
    publish_aggregate(a.w.state_sec, tile, tsec);
    publish_aggregate(a.w.state_esc, tile, te);
    sh.tm = tm;
    sh.tsec = tsec;
    sh.tesc = te;
  }
}

// Phase C (all threads): each thread's nibbles into the tile's sec bytes, at its chunk's offset + rank in chunk.
template <int NP>
__device__ __forceinline__ void enc2l_place_sec(const Enc2lArgs& a, Enc2lShared<NP>& sh) {
  constexpr int NQ = Enc2lShared<NP>::kNQ;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int spc_log2 = a.chunk_log2 - 8;
#pragma unroll 1
  for (int p = 0; p < NP; ++p) {
    const int q = p * kWarps + warp;
    const uint32_t q0 = sh.moff[q];
    if ((q + 1 < NQ ? sh.moff[q + 1] : sh.tm) == q0) continue;  // no marker in the slot (warp-uniform)
    const uint32_t c = uint32_t(__popc(sh.bits[p * kThreads + tid] & 0xFFu));
    const uint32_t incl = warp_incl_scan(c);
    if (c == 0u) continue;
    const int j = q >> spc_log2;
    const uint32_t ni = sh.cnib[j] + (q0 + incl - c) - sh.moff[j << spc_log2];
    const uint64_t v = uint64_t(sh.sec[p * kThreads + tid]) << (4u * (ni & 7u));
    atomicOr(&sh.secw[ni >> 3], uint32_t(v));  // neighbouring threads may share a word
    if (v >> 32) atomicOr(&sh.secw[(ni >> 3) + 1], uint32_t(v >> 32));
  }
}

// Phase D (all threads): sec bytes to the payload, escapes to the staging area, unless EXP2L already lost.
template <int NP>
__device__ __forceinline__ void enc2l_flush(const Enc2lArgs& a, const Enc2lShared<NP>& sh, const EncTileSrc& t) {
  constexpr int NQ = Enc2lShared<NP>::kNQ;
  const int tid = threadIdx.x, warp = tid >> 5;
  const uint64_t esec = sh.esec, eesc = sh.eesc, n = uint64_t(a.n);
  const uint32_t tsec = sh.tsec, te = sh.tesc;
  // the payload needs at least the layout of these prefixes: at >= 2n bytes RAW wins (FORMAT.md §5)
  if (Exp2lLayout::compute(n, a.chunk_log2, eesc + te, esec + tsec).body_bytes >= 2 * n || eesc + te > a.w.stage_cap)
    return;
  const uint8_t* sb = reinterpret_cast<const uint8_t*>(sh.secw);  // little-endian: nibble 2k = low half of byte k
  for (uint32_t k = uint32_t(tid); k < tsec; k += kThreads) a.body[a.off_sec + esec + k] = sb[k];
  if (te == 0u) return;
#pragma unroll 1
  for (int p = 0; p < NP; ++p) {
    const int q = p * kWarps + warp;
    if ((q + 1 < NQ ? sh.eoff[q + 1] : te) == sh.eoff[q]) continue;  // warp-uniform
    const uint32_t m8 = uint32_t(sh.bits[p * kThreads + tid]) >> 8;
    enc_stage_escapes(a.src, t, t.ts + int64_t(p) * kPassElems + tid * kGroup, m8, eesc + sh.eoff[q], a.chunk_log2,
                      a.w.stage_pos, a.w.stage_exp);
  }
}

// One EXP2L encode tile: max(2^chunk_log2, 8192) elements = NP passes of 2048 (whole chunks, <= 32 of them).
template <int NP>
__device__ __forceinline__ void enc2l_tile(const Enc2lArgs& a, const uint32_t tile) {
  __shared__ Enc2lShared<NP> sh;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  sh.lut[tid] = a.lut[tid];
  for (int k = tid; k < Enc2lShared<NP>::kSecWords; k += kThreads) sh.secw[k] = 0u;
  __syncthreads();
  EncTileSrc t = enc_tile_src(a.src, a.n, tile, int64_t(NP) * kPassElems);
  uint32_t ca = 0u, cb = 0u, m4 = 0u;
  enc_tile_passes<NP>(a.src, t, [&](int p, int64_t g, const uint4 v) {
    enc2l_group<NP>(a, sh, p, g, t.tend, v, ca, cb, m4);
  });
  ca = warp_sum_u32(ca);
  cb = warp_sum_u32(cb);
  m4 = warp_sum_u32(m4);
  if (lane == 0) {
    sh.red[0][warp] = ca;
    sh.red[1][warp] = cb;
    sh.red[2][warp] = m4;
  }
  __syncthreads();
  if (warp == 0) enc2l_tile_counts<NP>(a, sh, tile, t.ts);
  __syncthreads();
  if (warp == 0) {  // the other warps place their nibbles meanwhile
    const uint64_t es = lookback_exclusive(a.w.state_sec, tile, sh.tsec);
    const uint64_t ee = lookback_exclusive(a.w.state_esc, tile, sh.tesc);
    if (lane == 0) {
      sh.esec = es;
      sh.eesc = ee;
    }
  }
  enc2l_place_sec<NP>(a, sh);
  __syncthreads();
  enc2l_flush<NP>(a, sh, t);
}

template <int NP>
__global__ void __launch_bounds__(kThreads) enc2l_kernel(const Enc2lArgs a) {
  __shared__ uint32_t s_tile;
  if (threadIdx.x == 0) s_tile = atomicAdd(&a.w.ctl->base.tile_counter, 1u);
  __syncthreads();
  enc2l_tile<NP>(a, s_tile);
}

struct Fin2lArgs {
  uint8_t* out;
  Enc2lWorkspace w;
  int64_t n;
  int chunk_log2;
  int n_codes;
  uint8_t codebook[kMaxCodebook];
  uint64_t tag;
};

// Header (CRC over the shared table) and the zero gaps of an EXP2L payload (one thread).
__device__ __forceinline__ void enc2l_header(const Fin2lArgs& a, const Exp2lLayout& l, const uint32_t* crc_tab) {
  __align__(16) uint8_t hb[kHeaderBytes];
  pack_header(make_exp2l_header(a.codebook, a.n_codes, a.chunk_log2, l.n, l.n_escapes, l.sec_bytes, l.body_bytes,
                                vload(&a.w.ctl->base.sum_a), vload(&a.w.ctl->base.sum_b), a.tag),
              hb, crc_tab);
#pragma unroll
  for (int i = 0; i < kHeaderBytes / 16; ++i)
    reinterpret_cast<uint4*>(a.out)[i] = reinterpret_cast<const uint4*>(hb)[i];
  uint8_t* body = a.out + kHeaderBytes;
  const uint64_t gaps[6][2] = {{l.n, l.off_codes},
                               {l.off_codes + 24 * ((l.n + 63) / 64), l.off_scounts},
                               {l.off_scounts + 2 * l.n_chunks, l.off_sec},
                               {l.off_sec + l.sec_bytes, l.off_counts},
                               {l.off_counts + 2 * l.n_chunks, l.off_pos},
                               {l.off_pos + 2 * l.n_escapes, l.off_exp}};
  for (int s = 0; s < 6; ++s)
    for (uint64_t k = gaps[s][0]; k < gaps[s][1]; ++k) body[k] = 0;  // each gap < 16 bytes (alignment)
}

// FORMAT.md §5 with the totals of the EXP2L tiles: EXP2L (header, gaps, staged sections), or open the gate.
__global__ void __launch_bounds__(kThreads) enc2l_finish_kernel(const Fin2lArgs a) {
  __shared__ uint32_t s_crc[256];
  const int tid = threadIdx.x;
  const uint64_t n = uint64_t(a.n);
  const uint64_t sec_bytes = ld_relaxed(a.w.state_sec + (a.w.ntiles - 1)) & kValMask;  // last inclusive prefixes
  const uint64_t m = ld_relaxed(a.w.state_esc + (a.w.ntiles - 1)) & kValMask;
  const Exp2lLayout l = Exp2lLayout::compute(n, a.chunk_log2, m, sec_bytes);
  const uint64_t b4 = Exp4Layout::compute(n, a.chunk_log2, a.w.ctl->m4).body_bytes;
  if (!(l.body_bytes < (b4 < 2 * n ? b4 : 2 * n))) {  // ties go to the simpler mode
    if (blockIdx.x == 0 && tid == 0) a.w.ctl->gate = 1u;
    return;
  }
  if (blockIdx.x == 0) {
    s_crc[tid] = crc32_table_entry(uint32_t(tid));
    __syncthreads();
    if (tid == 0) enc2l_header(a, l, s_crc);
  }
  uint8_t* body = a.out + kHeaderBytes;
  const uint64_t stride = uint64_t(gridDim.x) * kThreads, first = uint64_t(blockIdx.x) * kThreads + tid;
  for (uint64_t j = first; j < l.n_chunks; j += stride)
    *reinterpret_cast<uint16_t*>(body + l.off_counts + 2 * j) = a.w.stage_cnt[j];
  for (uint64_t j = first; j < m; j += stride) {
    *reinterpret_cast<uint16_t*>(body + l.off_pos + 2 * j) = a.w.stage_pos[j];
    body[l.off_exp + j] = a.w.stage_exp[j];
  }
}

// ---- host side ------------------------------------------------------------------------------------------------
// The EXP2L attempt: tiles, then the mode choice, which opens w.ctl->gate for the kernels queued after it if EXP2L
// loses. `codebook`: n_codes (<= 22) distinct exponents, most frequent first; n > 0, bf16.
static void launch_exp2l(const SzRegions* src, const uint8_t* codebook, int n_codes, int chunk_log2, uint64_t tag,
                         uint8_t* out, const Enc2lWorkspace& w, unsigned fin_grid, cudaStream_t stream) {
  (void)stream;  // unused by the CPU emulation's launches
  Enc2lArgs a{};
  a.src = *src;
  a.body = out + kHeaderBytes;
  a.w = w;
  a.n = src->n;
  const Exp2lLayout l0 = Exp2lLayout::compute(uint64_t(src->n), chunk_log2, 0, 0);
  a.n_chunks = l0.n_chunks;
  a.off_codes = l0.off_codes;
  a.off_scounts = l0.off_scounts;
  a.off_sec = l0.off_sec;
  a.chunk_log2 = chunk_log2;
  a.t4 = exp2l_exp4_sec_threshold(n_codes);
  exp2l_encode_lut(codebook, n_codes, a.lut);
  const dim3 grid(w.ntiles);
  with_enc_passes(chunk_log2, [&](auto np) { SZ_LAUNCH(enc2l_kernel<decltype(np)::value>, grid, stream, a); });
  Fin2lArgs f{};
  f.out = out;
  f.w = w;
  f.n = src->n;
  f.chunk_log2 = chunk_log2;
  f.n_codes = n_codes;
  for (int i = 0; i < n_codes; ++i) f.codebook[i] = codebook[i];
  f.tag = tag;
  SZ_LAUNCH(enc2l_finish_kernel, fin_grid, stream, f);
}

}  // namespace cudak
}  // namespace splitzip
