// Batched encode of the CUDA codec (included by splitzip_cuda.cu after its encode kernels): all payloads of one
// request (one per layer) in ONE kernel launch, after one memset of the control words.
//
// Blocks take global tickets from one atomic counter; ticket t belongs to the item whose tile range
// [tile0, tile0 + ntiles) holds it, so the tiles of every item start in order and the decoupled look-back of
// enc_exp4_tile only waits on running or finished blocks. EXP4 items run enc_exp4_tile; RAW items (other dtypes,
// no codebook, too small to gain) copy 16 KiB RAW tiles. The last block of an item to finish (per-item done
// counter, fenced) runs enc_finish_body with that one block: header (and lens[item]), gaps, staged exponents or
// the RAW fallback copy. Workspace: [64-byte batch control][EncCtl per item][look-back states][escape staging];
// only the part before the staging is cleared.
// EXP4 / RAW only (the first min(16, n_codes) exponents): EXP2L payloads (FORMAT.md §3a) come from
// splitzip_cuda_encode, one call per item (cuda_backend.encode_batch_into does that for two-level codebooks).
#pragma once

namespace splitzip {
namespace cudak {

struct BatchArgs {
  const SzBatchItem* items;  // device copy
  int count;
  int dtype;
  int esize;
  int chunk_log2;
  int n_codes;
  uint8_t codebook[16];
  uint8_t* ws;
  uint64_t* lens;
};

// Item holding ticket t: the last one with tile0 <= t (items are in tile order, every item has >= 1 tile).
__device__ __forceinline__ int batch_item_of(const SzBatchItem* items, int count, uint64_t t) {
  int lo = 0, hi = count;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (items[mid].tile0 <= t) lo = mid; else hi = mid;
  }
  return lo;
}

// The item's parts of the workspace (splitzip_cuda_encode_batch_plan).
__device__ __forceinline__ EncWork batch_work(const BatchArgs& b, const SzBatchItem& it, EncCtl* ctl) {
  return EncWork{ctl, reinterpret_cast<uint64_t*>(b.ws + it.state_off), b.ws + it.stage_off, it.stage_cap};
}

__device__ __forceinline__ EncArgs batch_enc_args(const BatchArgs& b, const SzBatchItem& it, EncCtl* ctl) {
  return make_enc_args(it.src, it.out, batch_work(b, it, ctl), b.chunk_log2, b.n_codes, b.codebook);
}

__device__ __forceinline__ FinArgs batch_fin_args(const BatchArgs& b, const SzBatchItem& it, EncCtl* ctl, int item) {
  FinArgs f = make_fin_args(it.src, it.out, batch_work(b, it, ctl), b.dtype, b.chunk_log2, b.n_codes, b.codebook,
                            it.tag);
  f.ntiles = it.exp4 ? uint32_t(it.ntiles) : 0u;
  f.raw_copied = it.exp4 ? 0 : 1;
  f.len_out = b.lens + item;
  return f;
}

template <int NP>
__global__ void __launch_bounds__(kThreads) enc_batch_kernel(const BatchArgs b) {
  __shared__ uint32_t s_ticket;
  __shared__ int s_item;
  __shared__ int s_last;
  EncCtl* ctls = reinterpret_cast<EncCtl*>(b.ws) + 1;  // ws[0..64): the ticket counter
  if (threadIdx.x == 0) {
    s_ticket = atomicAdd(&reinterpret_cast<EncCtl*>(b.ws)->tile_counter, 1u);
    s_item = batch_item_of(b.items, b.count, s_ticket);
  }
  __syncthreads();
  const SzBatchItem it = b.items[s_item];
  EncCtl* ctl = ctls + s_item;
  const uint32_t tile = s_ticket - uint32_t(it.tile0);
  if (it.exp4) {
    enc_exp4_tile<NP>(batch_enc_args(b, it, ctl), tile);
  } else {
    uint32_t ca = 0u, cb = 0u;
    const uint64_t nbytes = uint64_t(it.src.n) * uint64_t(b.esize);
    if (nbytes > 0)
      raw_tile<true, true, 4>(it.src, b.esize, it.out + kHeaderBytes, nbytes, uint64_t(tile) * kEncRawTileBytes,
                              ca, cb);
    block_checksum_add(ca, cb, &ctl->sum_a, &ctl->sum_b);
  }
  __syncthreads();  // this block's stores are issued
  if (threadIdx.x == 0) {
    __threadfence();
    s_last = atomicAdd(&ctl->tile_counter, 1u) == uint32_t(it.ntiles - 1);  // per-item done counter
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  enc_finish_body(batch_fin_args(b, it, ctl, s_item), 0u, 1u);
}

}  // namespace cudak
}  // namespace splitzip

extern "C" {

size_t splitzip_cuda_encode_batch_plan(SzBatchItem* items, int count, int dtype, int n_codes, int chunk_log2) {
  using namespace splitzip;
  using namespace splitzip::cudak;
  const int esize = dtype_elem_size(dtype);
  if (items == nullptr || count < 1 || esize == 0) return 0;
  uint64_t off = sizeof(EncCtl) * (uint64_t(count) + 1), tile0 = 0;
  for (int i = 0; i < count; ++i) {  // control words and look-back states first: the part that is cleared
    const EncPlan p = enc_plan(items[i].src.n, dtype, n_codes > 0, false, chunk_log2);  // EXP4 / RAW only
    const uint64_t nbytes = uint64_t(items[i].src.n > 0 ? items[i].src.n : 0) * uint64_t(esize);
    const uint64_t raw_tiles = (nbytes + kEncRawTileBytes - 1) / kEncRawTileBytes;
    items[i].exp4 = p.exp4 ? 1 : 0;
    items[i].ntiles = p.exp4 ? p.ntiles : (raw_tiles > 0 ? raw_tiles : 1);
    items[i].tile0 = tile0;
    tile0 += items[i].ntiles;
    items[i].state_off = off;
    off += p.state_bytes;
    items[i].stage_cap = p.exp_cap;
  }
  for (int i = 0; i < count; ++i) {
    items[i].stage_off = off;
    off += align16(items[i].stage_cap);
  }
  return tile0 > 0x7FFFFFFFull ? 0 : size_t(off);
}

int splitzip_cuda_encode_batch(const SzBatchItem* items_host, const SzBatchItem* items_dev, int count, int dtype,
                               const uint8_t* codebook, int n_codes, int chunk_log2, uint64_t* lens,
                               void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using namespace splitzip;
  using namespace splitzip::cudak;
  const int esize = dtype_elem_size(dtype);
  if (esize == 0 || items_host == nullptr || items_dev == nullptr || count < 1 || lens == nullptr ||
      workspace == nullptr || !codebook_ok(codebook, n_codes, chunk_log2))
    return SZ_LAUNCH_BAD_ARG;
  if ((reinterpret_cast<uintptr_t>(workspace) & 15u) != 0) return SZ_LAUNCH_MISALIGNED;
  for (int i = 0; i < count; ++i) {
    const SzBatchItem& it = items_host[i];
    if (!regions_ok(&it.src) || it.out == nullptr) return SZ_LAUNCH_BAD_ARG;
    if ((reinterpret_cast<uintptr_t>(it.out) & 15u) != 0) return SZ_LAUNCH_MISALIGNED;
    if (it.out_capacity < encode_capacity(uint64_t(it.src.n), uint64_t(esize))) return SZ_LAUNCH_SMALL_BUFFER;
    if (it.ntiles < 1 || it.tile0 != (i ? items_host[i - 1].tile0 + items_host[i - 1].ntiles : 0))
      return SZ_LAUNCH_BAD_ARG;  // not planned
  }
  const SzBatchItem& last = items_host[count - 1];
  if (workspace_bytes < last.stage_off + align16(last.stage_cap)) return SZ_LAUNCH_SMALL_WORKSPACE;
  cudaError_t e = cudaMemsetAsync(workspace, 0, size_t(items_host[0].stage_off), stream);
  if (e != cudaSuccess) return launch_result(e);
  BatchArgs b{};
  b.items = items_dev;
  b.count = count;
  b.dtype = dtype;
  b.esize = esize;
  b.chunk_log2 = chunk_log2;
  b.n_codes = n_codes < kMaxCodes ? n_codes : kMaxCodes;  // the EXP4 table: first min(16, n_codes) (FORMAT.md §5)
  for (int i = 0; i < b.n_codes; ++i) b.codebook[i] = codebook[i];
  b.ws = static_cast<uint8_t*>(workspace);
  b.lens = lens;
  const dim3 grid(unsigned(last.tile0 + last.ntiles));
  with_enc_passes(chunk_log2, [&](auto np) { SZ_LAUNCH(enc_batch_kernel<decltype(np)::value>, grid, stream, b); });
  return launch_result(cudaGetLastError());
}

}  // extern "C"
