// SplitZip-KV CUDA codec (FORMAT.md v2; decodes v1 too): host launch API. No torch dependency; only the CUDA runtime.
//
// Encode and decode work on a LIST of device memory regions (the logical concatenation is the data), e.g. the
// equal-size pages of one layer of one request in a paged KV cache. Neither direction synchronizes with the
// host: every launcher only enqueues a cudaMemsetAsync and kernels on `stream` (safe inside CUDA-graph capture
// and on a side stream). The encoded length lives in the device-side header; the decode verdict lives in a
// device-side status word.
#pragma once

#include <cstddef>
#include <cstdint>

#include "splitzip/format.h"  // SzStatus

#if defined(SPLITZIP_CUDA_EMU)
#include "emu/cuda_emu.h"
#elif !defined(SPLITZIP_CUDA_NO_RUNTIME)  // host tests that only need the types below define this
#include <cuda_runtime_api.h>
#endif

extern "C" {

// Region table (all addresses are device addresses, all counts are in ELEMENTS of the wire dtype).
//   ptrs == null            : one region at ptr0 holding n elements (count == 1; prefix unused)
//   ptrs given, prefix null : region r < count at ptrs[r] holds `uniform` elements; n == count * uniform
//   ptrs given, prefix given: region r < count at ptrs[r] holds prefix[r+1] - prefix[r] elements (may be 0);
//                             prefix[0] == 0, prefix[count] == n, non-decreasing
// ptrs and prefix are DEVICE arrays (uint64/int64), trusted. n == 0 needs no region at all. Regions must not
// overlap the payload / output buffer.
typedef struct SzRegions {
  const uint64_t* ptrs;
  const int64_t* prefix;
  uint64_t ptr0;
  int64_t uniform;
  int64_t count;
  int64_t n;
} SzRegions;

// Device status words written by decode: status[0] = code (0 = OK, else an SzStatus of splitzip/format.h),
// status[1..2] = aux (u64, little-endian word order; for SZ_ERR_ESC_SUM the sum of the chunk counts), status[3] = 0.
// When several problems are present, the lowest code is kept (codes follow the check order of FORMAT.md §6).
// Messages: splitzip_vllm/codec/format.py (STATUS_MESSAGES).

// One payload of a batched encode (splitzip_cuda_encode_batch): the caller fills src / out / out_capacity / tag,
// splitzip_cuda_encode_batch_plan fills the rest (the item's tiles and workspace offsets).
typedef struct SzBatchItem {
  SzRegions src;          // device region table of the item's data (as for splitzip_cuda_encode)
  uint8_t* out;           // device, 16-byte aligned, out_capacity >= encode_capacity(src.n, elem_size)
  uint64_t out_capacity;
  uint64_t tag;           // transfer tag of this payload (FORMAT.md §6a)
  uint64_t tile0;         // plan: first tile of the item in the launch
  uint64_t ntiles;        // plan: tiles of the item (>= 1)
  uint64_t state_off;     // plan: workspace byte offset of the item's look-back state
  uint64_t stage_off;     // plan: workspace byte offset of the item's escape staging
  uint64_t stage_cap;     // plan: its capacity in bytes
  int32_t exp4;           // plan: 1 = EXP4 tiles, 0 = RAW tiles
  int32_t pad;
} SzBatchItem;

// Launcher results (host-side argument problems; nothing is enqueued). Positive values are cudaError_t.
enum SzLaunchResult {
  SZ_LAUNCH_OK = 0,
  SZ_LAUNCH_BAD_ARG = -1,         // inconsistent arguments (dtype, chunk_log2, codebook, region table, ...)
  SZ_LAUNCH_MISALIGNED = -2,      // encode output / decode payload not 16-byte aligned
  SZ_LAUNCH_SMALL_BUFFER = -3,    // encode output smaller than encode_capacity
  SZ_LAUNCH_SMALL_WORKSPACE = -4  // workspace smaller than *_workspace_bytes()
};

#if !defined(SPLITZIP_CUDA_NO_RUNTIME) || defined(SPLITZIP_CUDA_EMU)
// Bytes of device workspace that encode needs (contents need not be initialized; the launcher clears what it
// needs with cudaMemsetAsync). `codebook_given` = n_codes > 0; `two_level` as for splitzip_cuda_encode.
size_t splitzip_cuda_encode_workspace_bytes(int64_t n_elems, int dtype, int codebook_given, int two_level,
                                            int chunk_log2);

// Encode the concatenation of `src` (elements of wire dtype `dtype`) into `out` (device, 16-byte aligned,
// `out_capacity >= 96 + n*elem_size + 64`) as a format-v2 payload bound to transfer `tag` (FORMAT.md §6a).
// `codebook` is HOST memory with `n_codes` (0..22) distinct exponents, most frequent first (n_codes == 0 =>
// RAW); `two_level` != 0 allows EXP2L (FORMAT.md §5: EXP2L, EXP4 with the first min(16, n_codes) exponents, or
// RAW, whichever is smallest, chosen on the device). Byte-identical to splitzip_vllm/codec/reference.py. The
// payload length is 96 + body_bytes of the header the device writes at out[0..96).
int splitzip_cuda_encode(const SzRegions* src, int dtype, const uint8_t* codebook, int n_codes, int two_level,
                         int chunk_log2, uint64_t tag, uint8_t* out, uint64_t out_capacity, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream);

// Batched encode of `count` payloads (e.g. all layers of one request) in ONE kernel launch (plus one memset):
// every payload is byte-identical to splitzip_cuda_encode's with two_level = 0 (EXP4 / RAW only); lens[i] (device
// u64) receives payload i's length.
// All items share dtype, codebook and chunk_log2. First call splitzip_cuda_encode_batch_plan on the host array
// (fills the plan fields, returns the workspace bytes, 0 for bad arguments), copy the array to the device, then
// launch with both copies (items_host for the grid size, items_dev read by the kernel).
size_t splitzip_cuda_encode_batch_plan(SzBatchItem* items, int count, int dtype, int n_codes, int chunk_log2);
int splitzip_cuda_encode_batch(const SzBatchItem* items_host, const SzBatchItem* items_dev, int count, int dtype,
                               const uint8_t* codebook, int n_codes, int chunk_log2, uint64_t* lens,
                               void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Bytes of device workspace that decode needs for a destination of n_elems elements of `dtype`.
size_t splitzip_cuda_decode_workspace_bytes(int64_t n_elems, int dtype);

// Decode `payload` (device, 16-byte aligned, `payload_len` readable bytes, format v1 or v2) into `dst` (the
// destination's element count is dst->n, its wire dtype `dtype`). Validates everything of FORMAT.md §6 on the
// device, including that the payload's transfer tag is `expected_tag` (§6a), and writes the verdict to
// `status` (device, 4 x uint32). Never reads payload bytes at or beyond payload_len and never writes outside
// the destination regions; a header problem (tag included) writes nothing, while on a failure of the escape
// table or the checksum the destination holds garbage.
int splitzip_cuda_decode(const uint8_t* payload, uint64_t payload_len, const SzRegions* dst, int dtype,
                         uint64_t expected_tag, uint32_t* status, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream);
#endif

}  // extern "C"
