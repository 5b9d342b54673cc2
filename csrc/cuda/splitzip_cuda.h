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
// needs with cudaMemsetAsync). `codebook_given` = n_codes > 0.
size_t splitzip_cuda_encode_workspace_bytes(int64_t n_elems, int dtype, int codebook_given, int chunk_log2);

// Encode the concatenation of `src` (elements of wire dtype `dtype`) into `out` (device, 16-byte aligned,
// `out_capacity >= 96 + n*elem_size + 64`) as a format-v2 payload bound to transfer `tag` (FORMAT.md §6a).
// `codebook` is HOST memory with `n_codes` distinct exponents (n_codes == 0 => RAW). Byte-identical to
// splitzip_vllm/codec/reference.py. The payload length is 96 + body_bytes of the header the device writes at
// out[0..96).
int splitzip_cuda_encode(const SzRegions* src, int dtype, const uint8_t* codebook, int n_codes, int chunk_log2,
                         uint64_t tag, uint8_t* out, uint64_t out_capacity, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream);

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
