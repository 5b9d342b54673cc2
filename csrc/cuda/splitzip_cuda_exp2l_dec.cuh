// EXP2L decode of the CUDA codec (FORMAT.md §3a, validation §6). Included by splitzip_cuda.cu after DecCtl (it
// uses the region helpers, look-back, checksum and status helpers defined before it).
//
// Every structural check of FORMAT.md §6 step 4 runs BEFORE anything is written, so a payload that fails one
// leaves the destination untouched; only a checksum failure (step 5) leaves written data. Tiles are the EXP4
// decode tiles, max(2^chunk_log2, 16384) elements (whole chunks, at most 64):
//   dec2l_check_kernel: one block per tile, in start order. Warp 0 reads the tile's sec_counts and escape counts
//     (each bounded by its chunk length) and publishes two aggregates, secondary bytes and escapes, for two
//     decoupled look-backs; meanwhile every thread counts the marker codes of its 64-element blocks (popcount of
//     plane_0 & plane_1 & plane_2, codes past n ignored) per chunk. With the prefixes, each chunk's markers are
//     compared with its count and the tile's escape positions checked (inside the chunk, strictly increasing);
//     the last tile compares the totals with sec_bytes and n_escapes. EXP2L's checks are reported in FORMAT.md
//     §6's ORDER, not by lowest code (chunk c's marker check (c) comes before chunk c's positions (d), which come
//     before chunk c+1's checks), so each failure gets a rank in that order and the smallest rank wins
//     (atomicMin); the last block to finish turns it into the status (the reference decoder's code and aux) and
//     clears ctl->ok. The prefixes of every tile are kept for:
//   dec2l_write_kernel: one block per tile. The rank base of each 64-element block's markers inside its chunk
//     (block-wide scan of the marker counts); then 16 elements per thread and pass: primary codes from the
//     planes, a marker of rank r takes nibble r of its chunk's sec bytes (never outside them: the counts were
//     checked); 16-byte stores and checksum terms as EXP4; then the tile's escapes are patched, the checksum
//     adjusted by the change of each patched element (read back from the destination: a corrupted payload may
//     escape an element whose primary code is not the marker). The last block compares the checksum.
// dec_main_kernel leaves EXP2L payloads to these two kernels (the host does not know the mode: the EXP2L kernels
// exit at once for other modes, dec_main_kernel for EXP2L).
#pragma once

namespace splitzip {
namespace cudak {

// Failure ranks of FORMAT.md §6 step 4 for EXP2L, in check order; the smallest one is reported.
constexpr unsigned long long kRankNone = ~0ull;
constexpr unsigned long long kRankSecCount = 0;     // (a) a sec count above its chunk length
constexpr unsigned long long kRankSecBytes = 1;     // (a) sum ceil(cnt/2) != sec_bytes
constexpr unsigned long long kRankEscSum = 2;       // (b) escape counts do not sum to n_escapes
constexpr unsigned long long kRankEscCount = 3;     // (b) an escape count above its chunk length
constexpr unsigned long long kRankChunk = 4;        // + 2c: chunk c's marker count (c); + 2c + 1: its positions (d)
constexpr unsigned long long kRankEscOrder = ~0ull - 1;  // (d) order: reported after all chunks, as EXP4

struct Dec2lCtl {  // 128 bytes of a bf16 decode's workspace, cleared before every decode
  unsigned int tile_counter;  // check kernel: tiles in block start order (look-back)
  unsigned int done_check;
  unsigned int done_write;
  unsigned int sum_a, sum_b;  // checksum of the written data
  unsigned int pad0[3];
  unsigned long long rank;    // smallest failed check (kRank*); kRankNone set by the header kernel
  uint64_t off_scounts, off_sec, sec_bytes;
  uint64_t need;              // sum_c ceil(cnt_c / 2): SEC_BYTES's aux (last tile)
  uint64_t esc_sum;           // sum of the escape counts: ESC_SUM's aux (last tile)
  uint8_t stab[16];           // secondary table; entry 15 (escape) and entries past n_sec_codes are 0
  uint8_t pad1[32];
};
static_assert(sizeof(Dec2lCtl) == 128, "Dec2lCtl is 128 bytes");

struct Dec2lArgs {
  const uint8_t* payload;
  SzRegions dst;
  DecCtl* ctl;
  Dec2lCtl* c2;
  uint64_t* state_sec;  // look-back: secondary bytes per tile
  uint64_t* state_esc;  // look-back: escapes per tile
  uint64_t* excl;       // per tile: its exclusive prefixes (secondary bytes, escapes), from the check kernel
  uint32_t* status;
};

// dec_header_kernel, EXP2L header valid for the destination: layout into the control blocks.
__device__ __forceinline__ void dec2l_header(const Header& h, DecCtl* ctl, Dec2lCtl* c2) {
  const Exp2lLayout l = Exp2lLayout::compute(h.n_elems, h.chunk_log2, h.n_escapes, exp2l_sec_bytes(h));
  set_dec_layout(ctl, l);
  c2->off_scounts = l.off_scounts;
  c2->off_sec = l.off_sec;
  c2->sec_bytes = l.sec_bytes;
  for (int i = 0; i < kExp2lMaxSecondary; ++i) c2->stab[i] = h.ext[i];
  c2->stab[kExp2lSecEscape] = 0;
  c2->rank = kRankNone;
}

__device__ __forceinline__ uint32_t ld_u16(const uint8_t* p) { return *reinterpret_cast<const uint16_t*>(p); }

// Marker bits (primary code 7: all three planes set) of the 64-element block starting at element e0 < n; codes
// past n are not the data's (FORMAT.md §3a), so they are masked off.
__device__ __forceinline__ uint64_t block_markers(const uint8_t* codes, int64_t e0, int64_t n) {
  const uint64_t* q = reinterpret_cast<const uint64_t*>(codes + 3 * (uint64_t(e0) / 8));
  uint64_t mk = __ldg(q) & __ldg(q + 1) & __ldg(q + 2);
  if (n - e0 < 64) mk &= (uint64_t(1) << (n - e0)) - 1;
  return mk;
}

// Chunk j (< 64) of the tile whose escapes [cstart[j], cstart[j+1]) hold escape r of the tile.
__device__ __forceinline__ int chunk_of_escape(const uint32_t* cstart, uint32_t r) {
  int j = 0;
#pragma unroll
  for (int step = 32; step > 0; step >>= 1)
    if (j + step < 64 && cstart[j + step] <= r) j += step;
  return j;
}

// Warp 0: the tile's counts, two chunks per lane: s_cnt / s_cstart (secondary counts; exclusive escape prefix, T
// past the tile's chunks), the (a)/(b) per-chunk bounds, and the two aggregates published for the look-backs.
__device__ __forceinline__ void dec2l_read_counts(const Dec2lArgs& a, const DecCtl& c, const uint8_t* body,
                                                  uint32_t tile, uint64_t c0, int nch, uint32_t* s_cnt,
                                                  uint32_t* s_cstart, uint32_t& tsec, uint32_t& te) {
  const int lane = threadIdx.x & 31;
  const uint64_t C = uint64_t(1) << c.chunk_log2;
  uint32_t cnt[2] = {0u, 0u}, esc[2] = {0u, 0u};
  bool over_s = false, over_e = false;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int j = 2 * lane + h;
    if (j < nch && c0 + uint64_t(j) < c.n_chunks) {
      const uint64_t ch = c0 + uint64_t(j), rest = c.n - ch * C, clen = rest < C ? rest : C;
      cnt[h] = ld_u16(body + a.c2->off_scounts + 2 * ch);
      esc[h] = ld_u16(body + c.off_counts + 2 * ch);
      over_s |= cnt[h] > clen;
      over_e |= esc[h] > clen;
    }
    s_cnt[j] = cnt[h];
  }
  tsec = warp_sum_u32((cnt[0] + 1u) / 2u + (cnt[1] + 1u) / 2u);
  const uint32_t pair = esc[0] + esc[1];
  const uint32_t incl = warp_incl_scan(pair);
  te = __shfl_sync(kFull, incl, 31);
  s_cstart[2 * lane] = incl - pair;
  s_cstart[2 * lane + 1] = incl - pair + esc[0];
  const bool bs = __any_sync(kFull, over_s), be = __any_sync(kFull, over_e);
  if (lane == 0) {
    publish_aggregate(a.state_sec, tile, tsec);
    publish_aggregate(a.state_esc, tile, te);
    if (bs) atomicMin(&a.c2->rank, kRankSecCount);
    if (be) atomicMin(&a.c2->rank, kRankEscCount);
  }
}

// (d) for the tile's escapes [ee, ee + te): inside their chunks and strictly increasing (format.h check_escape).
__device__ __forceinline__ void dec2l_check_escapes(const Dec2lArgs& a, const DecCtl& c, const uint8_t* body,
                                                    uint64_t c0, const uint32_t* s_cstart, uint64_t ee,
                                                    uint32_t te) {
  if (ee + te > c.n_escapes) return;  // past esc_pos: the last tile reports ESC_SUM, which comes first
  const uint64_t C = uint64_t(1) << c.chunk_log2;
  for (uint32_t r = threadIdx.x; r < te; r += kThreads) {
    const int j = chunk_of_escape(s_cstart, r);
    const uint64_t ch = c0 + uint64_t(j), rest = c.n - ch * C, clen = rest < C ? rest : C;
    const uint64_t k = ee + r;
    const bool first = r == s_cstart[j];  // otherwise escape k - 1 is in the same chunk
    const uint32_t pos = ld_u16(body + c.off_pos + 2 * k);
    const int st = check_escape(pos, first, first ? 0u : ld_u16(body + c.off_pos + 2 * (k - 1)), clen);
    if (st == SZ_ERR_ESC_POS) atomicMin(&a.c2->rank, kRankChunk + 2 * ch + 1);
    if (st == SZ_ERR_ESC_ORDER) atomicMin(&a.c2->rank, kRankEscOrder);
  }
}

// One check tile of NP x 4096 elements.
template <int NP>
__device__ __forceinline__ void dec2l_check_tile(const Dec2lArgs& a, const DecCtl& c, uint32_t tile) {
  constexpr int64_t TE = int64_t(NP) * kDecPassElems;
  __shared__ uint32_t s_have[64], s_cnt[64], s_cstart[64];
  __shared__ uint32_t s_te;
  __shared__ unsigned long long s_ee;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint8_t* body = a.payload + c.header_bytes;
  const int clog2 = int(c.chunk_log2);
  const int64_t n = int64_t(c.n), ts = int64_t(tile) * TE;
  const uint64_t c0 = uint64_t(ts) >> clog2;
  const int nch = int(TE >> clog2);
  if (tid < 64) s_have[tid] = 0u;
  __syncthreads();
  uint32_t tsec = 0u, te = 0u;
  if (warp == 0) dec2l_read_counts(a, c, body, tile, c0, nch, s_cnt, s_cstart, tsec, te);
  for (int64_t b = tid; b < TE / 64 && ts + 64 * b < n; b += kThreads)  // (c): markers per chunk
    atomicAdd(&s_have[(64 * b) >> clog2], uint32_t(__popcll(block_markers(body + c.off_codes, ts + 64 * b, n))));
  if (warp == 0) {
    const uint64_t es = lookback_exclusive(a.state_sec, tile, tsec);
    const uint64_t ee = lookback_exclusive(a.state_esc, tile, te);
    if (lane == 0) {
      a.excl[2 * uint64_t(tile)] = es;
      a.excl[2 * uint64_t(tile) + 1] = ee;
      s_ee = ee;
      s_te = te;
      if (uint64_t(tile) == c.ntiles - 1) {  // the totals (a), (b)
        a.c2->need = es + tsec;
        a.c2->esc_sum = ee + te;
        if (es + tsec != a.c2->sec_bytes) atomicMin(&a.c2->rank, kRankSecBytes);
        if (ee + te != c.n_escapes) atomicMin(&a.c2->rank, kRankEscSum);
      }
    }
  }
  __syncthreads();
  if (tid < nch && c0 + uint64_t(tid) < c.n_chunks && s_have[tid] != s_cnt[tid])
    atomicMin(&a.c2->rank, kRankChunk + 2 * (c0 + uint64_t(tid)));
  dec2l_check_escapes(a, c, body, c0, s_cstart, s_ee, s_te);
}

// The verdict of the check kernel (its last block): the status of the smallest rank, and no writes after it.
__device__ __forceinline__ void dec2l_verdict(const Dec2lArgs& a) {
  const unsigned long long r = *reinterpret_cast<volatile unsigned long long*>(&a.c2->rank);
  if (r == kRankNone) return;
  uint32_t code = SZ_ERR_ESC_ORDER;
  uint64_t aux = 0;
  if (r == kRankSecCount) {
    code = SZ_ERR_SEC_COUNT;
  } else if (r == kRankSecBytes) {
    code = SZ_ERR_SEC_BYTES;
    aux = *reinterpret_cast<volatile uint64_t*>(&a.c2->need);
  } else if (r == kRankEscSum) {
    code = SZ_ERR_ESC_SUM;
    aux = *reinterpret_cast<volatile uint64_t*>(&a.c2->esc_sum);
  } else if (r == kRankEscCount) {
    code = SZ_ERR_ESC_COUNT;
  } else if (r != kRankEscOrder) {
    const uint64_t k = r - kRankChunk;
    code = (k & 1) ? SZ_ERR_ESC_POS : SZ_ERR_SEC_MARKERS;
    aux = (k & 1) ? 0 : k >> 1;  // SEC_MARKERS names the chunk
  }
  a.status[1] = uint32_t(aux);
  a.status[2] = uint32_t(aux >> 32);
  a.status[0] = code;  // the header passed: status[0] was 0
  a.ctl->ok = 0u;      // dec2l_write_kernel writes nothing
}

__global__ void __launch_bounds__(kThreads) dec2l_check_kernel(const Dec2lArgs a) {
  __shared__ uint32_t s_tile;
  const DecCtl& c = *a.ctl;
  if (c.ok == 0u || c.mode != uint32_t(kModeExp2l)) return;
  if (threadIdx.x == 0) s_tile = atomicAdd(&a.c2->tile_counter, 1u);
  __syncthreads();
  if (uint64_t(s_tile) < c.ntiles) {
    if (c.chunk_log2 == 15) dec2l_check_tile<8>(a, c, s_tile);  // 32768-element tiles
    else dec2l_check_tile<4>(a, c, s_tile);                     // 16384-element tiles
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&a.c2->done_check, 1u) == gridDim.x - 1) {  // every tile's checks are in
      __threadfence();
      dec2l_verdict(a);
    }
  }
}

template <int NP>
struct Dec2lWriteShared {
  uint32_t mpre[NP * kDecPassElems / 64];  // markers of the tile before each 64-element block
  uint32_t csec[64];                       // sec bytes of the tile's chunks before chunk j
  uint32_t cstart[64];                     // escapes of the tile's chunks before chunk j (T past them)
  uint32_t wsum[kWarps];
  uint32_t te;
  uint8_t ptab[8], stab[16];
};

// Warp 0: the tile's chunk prefixes of secondary bytes and escapes (counts validated by the check kernel).
template <int NP>
__device__ __forceinline__ void dec2l_chunk_prefixes(const Dec2lArgs& a, const DecCtl& c, const uint8_t* body,
                                                     uint64_t c0, Dec2lWriteShared<NP>& sh) {
  const int lane = threadIdx.x & 31;
  const int nch = int((int64_t(NP) * kDecPassElems) >> c.chunk_log2);
  uint32_t sb[2] = {0u, 0u}, esc[2] = {0u, 0u};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint64_t ch = c0 + uint64_t(2 * lane + h);
    if (2 * lane + h < nch && ch < c.n_chunks) {
      sb[h] = (ld_u16(body + a.c2->off_scounts + 2 * ch) + 1u) / 2u;
      esc[h] = ld_u16(body + c.off_counts + 2 * ch);
    }
  }
  const uint32_t ps = sb[0] + sb[1], pe = esc[0] + esc[1];
  const uint32_t is = warp_incl_scan(ps), ie = warp_incl_scan(pe);
  sh.csec[2 * lane] = is - ps;
  sh.csec[2 * lane + 1] = is - ps + sb[0];
  sh.cstart[2 * lane] = ie - pe;
  sh.cstart[2 * lane + 1] = ie - pe + esc[0];
  if (lane == 31) sh.te = ie;
}

// All threads: sh.mpre = markers of the tile before each 64-element block (each thread scans 1 or 2 blocks).
template <int NP>
__device__ __forceinline__ void dec2l_marker_prefix(const DecCtl& c, const uint8_t* body, int64_t ts,
                                                    Dec2lWriteShared<NP>& sh) {
  constexpr int PER = NP * kDecPassElems / 64 / kThreads;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t n = int64_t(c.n);
  uint32_t cnt[PER], sum = 0u;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int64_t e0 = ts + 64 * int64_t(tid * PER + i);
    cnt[i] = e0 < n ? uint32_t(__popcll(block_markers(body + c.off_codes, e0, n))) : 0u;
    sum += cnt[i];
  }
  const uint32_t incl = warp_incl_scan(sum);
  if (lane == 31) sh.wsum[warp] = incl;
  __syncthreads();
  uint32_t run = incl - sum;
  for (int w = 0; w < warp; ++w) run += sh.wsum[w];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    sh.mpre[tid * PER + i] = run;
    run += cnt[i];
  }
}

// 16 elements at g (j0 = g % 64 in {0, 16, 32, 48}) of the tile at ts; the first nvalid are real.
template <int NP>
__device__ __forceinline__ void dec2l_group16(const uint8_t* body, uint64_t off_codes, const uint8_t* sec,
                                              const Dec2lWriteShared<NP>& sh, int clog2, int64_t ts, int64_t g,
                                              int nvalid, uint4& w0, uint4& w1) {
  const uint4 smv = __ldg(reinterpret_cast<const uint4*>(body + g));
  const uint64_t* q = reinterpret_cast<const uint64_t*>(body + off_codes + 24 * (uint64_t(g) >> 6));
  const uint64_t p0 = __ldg(q), p1 = __ldg(q + 1), p2 = __ldg(q + 2);
  const int64_t off = g - ts;
  const int b = int(off >> 6), j0 = int(off & 63), jc = int(off >> clog2);
  const uint8_t* cs = sec + sh.csec[jc];  // chunk jc's sec bytes
  uint32_t r = sh.mpre[b] - sh.mpre[jc << (clog2 - 6)] + uint32_t(__popcll(p0 & p1 & p2 & ((uint64_t(1) << j0) - 1)));
  const uint32_t smw[4] = {smv.x, smv.y, smv.z, smv.w};
  uint32_t x[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    if (k >= nvalid) continue;  // past n: no code is read (its nibble would lie outside the chunk)
    const int bit = j0 + k;
    const uint32_t pc = uint32_t((p0 >> bit) & 1u) | uint32_t(((p1 >> bit) & 1u) << 1) |
                        uint32_t(((p2 >> bit) & 1u) << 2);
    uint32_t e;
    if (pc == uint32_t(kExp2lMarker)) {  // rank r < the chunk's count (checked): inside the chunk's bytes
      e = sh.stab[(__ldg(cs + (r >> 1)) >> (4u * (r & 1u))) & 15u];
      ++r;
    } else {
      e = sh.ptab[pc];
    }
    x[k >> 1] |= uint32_t(combine((smw[k >> 2] >> (8 * (k & 3))) & 0xFFu, e)) << (16 * (k & 1));
  }
  w0 = make_uint4(x[0], x[1], x[2], x[3]);
  w1 = make_uint4(x[4], x[5], x[6], x[7]);
}

// The tile's escapes [ee, ee + te), patched after the dense stores (validated positions).
__device__ __forceinline__ void dec2l_patch(const Dec2lArgs& a, const DecCtl& c, const uint8_t* body,
                                            const uint32_t* cstart, uint32_t te, uint64_t ee, int64_t ts, bool fast,
                                            uint16_t* dp, uint32_t& ca, uint32_t& cb) {
  const int clog2 = int(c.chunk_log2);
  const uint64_t C = uint64_t(1) << clog2, c0 = uint64_t(ts) >> clog2;
  for (uint32_t r = threadIdx.x; r < te; r += kThreads) {
    const uint64_t ch = c0 + uint64_t(chunk_of_escape(cstart, r)), k = ee + r;
    const uint64_t rest = c.n - ch * C, clen = rest < C ? rest : C;
    const uint32_t pos = ld_u16(body + c.off_pos + 2 * k);
    if (pos >= clen) continue;  // checked before; kept so that no state can write past the chunk
    const uint64_t i = ch * C + pos;
    const uint32_t xd = fast ? uint32_t(dp[int64_t(i) - ts]) : uint32_t(load_elem16(a.dst, int64_t(i)));
    const uint32_t xn = combine(body[i], body[c.off_exp + k]);
    if (fast) dp[int64_t(i) - ts] = uint16_t(xn);
    else store_elem16(a.dst, int64_t(i), uint16_t(xn));
    cudabits::checksum_delta(i, xd, xn, ca, cb);
  }
}

// One write tile of NP x 4096 elements (the check kernel's tile).
template <int NP>
__device__ __forceinline__ void dec2l_write_tile(const Dec2lArgs& a, const DecCtl& c, uint32_t tile, uint32_t& ca,
                                                 uint32_t& cb) {
  constexpr int64_t TE = int64_t(NP) * kDecPassElems;
  __shared__ Dec2lWriteShared<NP> sh;
  const int tid = threadIdx.x;
  const uint8_t* body = a.payload + c.header_bytes;
  const int clog2 = int(c.chunk_log2);
  const int64_t n = int64_t(c.n), ts = int64_t(tile) * TE, tend = ts + TE < n ? ts + TE : n;
  if (tid < 8) sh.ptab[tid] = c.table[tid];  // zero past n_codes (validated); entry 7 unused (marker)
  if (tid < 16) sh.stab[tid] = a.c2->stab[tid];
  if (tid < 32) dec2l_chunk_prefixes<NP>(a, c, body, uint64_t(ts) >> clog2, sh);
  dec2l_marker_prefix<NP>(c, body, ts, sh);  // its __syncthreads also publishes the lines above
  __syncthreads();
  const uint64_t esec = a.excl[2 * uint64_t(tile)], eesc = a.excl[2 * uint64_t(tile) + 1];
  const uint8_t* sec = body + a.c2->off_sec + esec;
  const RegionLoc L = region_of(a.dst, ts);
  uint16_t* dp = reinterpret_cast<uint16_t*>(L.base) + (ts - L.start);
  const bool fast = L.end >= tend && (reinterpret_cast<uintptr_t>(dp) & 15u) == 0;
  RegionLoc cur = L;
#pragma unroll 1
  for (int p = 0; p < NP; ++p) {
    const int64_t g = ts + int64_t(p) * kDecPassElems + tid * 16;
    if (g >= tend) continue;
    const int nvalid = g + 16 <= tend ? 16 : int(tend - g);
    uint4 w0, w1;
    dec2l_group16<NP>(body, c.off_codes, sec, sh, clog2, ts, g, nvalid, w0, w1);
    if (fast && nvalid == 16) {
      reinterpret_cast<uint4*>(dp + (g - ts))[0] = w0;
      reinterpret_cast<uint4*>(dp + (g - ts))[1] = w1;
    } else {
      store_group16_cursor(a.dst, cur, g, nvalid, w0, w1);
    }
    checksum_vec(w0, uint32_t(uint64_t(g) * 2u), ca, cb);
    checksum_vec(w1, uint32_t(uint64_t(g) * 2u + 16u), ca, cb);
  }
  __syncthreads();  // the dense stores are visible to the block before the patches read them back
  dec2l_patch(a, c, body, sh.cstart, sh.te, eesc, ts, fast, dp, ca, cb);
}

__global__ void __launch_bounds__(kThreads) dec2l_write_kernel(const Dec2lArgs a) {
  const DecCtl& c = *a.ctl;
  if (c.ok == 0u || c.mode != uint32_t(kModeExp2l)) return;  // another mode, or a failed check
  uint32_t ca = 0u, cb = 0u;
  if (uint64_t(blockIdx.x) < c.ntiles) {
    if (c.chunk_log2 == 15) dec2l_write_tile<8>(a, c, blockIdx.x, ca, cb);
    else dec2l_write_tile<4>(a, c, blockIdx.x, ca, cb);
  }
  block_checksum_add(ca, cb, &a.c2->sum_a, &a.c2->sum_b);
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&a.c2->done_write, 1u) == gridDim.x - 1) {  // last block: every block's terms are in
      __threadfence();
      const uint32_t sa = atomicAdd(&a.c2->sum_a, 0u), sb = atomicAdd(&a.c2->sum_b, 0u);
      if (sa != c.checksum_a || sb != c.checksum_b) record_error(a.status, SZ_ERR_CHECKSUM);
    }
  }
}

}  // namespace cudak
}  // namespace splitzip
