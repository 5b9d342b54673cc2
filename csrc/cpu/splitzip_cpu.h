// SplitZip-KV CPU codec (FORMAT.md v2; decodes v1 too) over a list of contiguous memory regions. No torch dependency.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace splitzip {
namespace cpu {

// A payload is corrupted / truncated / does not fit the destination (Python: PayloadError). Carries the SzStatus
// of splitzip/format.h and its aux value (SZ_ERR_ESC_SUM: the sum of the chunk counts); the Python layer words
// the message (splitzip_vllm/codec/format.py STATUS_MESSAGES).
class PayloadError : public std::runtime_error {
 public:
  PayloadError(int status, uint64_t aux = 0)
      : std::runtime_error("splitzip payload status " + std::to_string(status) + " " + std::to_string(aux)),
        status(status), aux(aux) {}
  int status;
  uint64_t aux;
};
// The caller passed inconsistent arguments (Python: ValueError).
class ArgumentError : public std::invalid_argument {
 public:
  explicit ArgumentError(const std::string& m) : std::invalid_argument(m) {}
};

struct SrcRegion {
  const uint8_t* ptr;
  uint64_t n_bytes;
};
struct DstRegion {
  uint8_t* ptr;
  uint64_t n_bytes;
};

// Encode the logical concatenation of `regions` (elements of wire dtype `dtype`) into `out`
// (`out_cap >= encode_capacity = 96 + raw bytes + 64`) as a format-v2 payload bound to transfer `tag`
// (FORMAT.md §6a; 0 = unbound). `codebook` holds `n_codes` (<= 22) distinct exponents, most frequent first
// (nullptr / 0 => RAW); the mode is chosen by FORMAT.md §5, EXP2L only when `two_level`.
// Returns the payload length (96 + body_bytes).
uint64_t encode(const SrcRegion* regions, size_t n_regions, int dtype, const uint8_t* codebook, int n_codes,
                int chunk_log2, uint8_t* out, uint64_t out_cap, uint64_t tag = 0, bool two_level = false);

// Decode `payload` (`payload_len` readable bytes, format v1 or v2) into `regions`. Throws PayloadError on any
// problem of FORMAT.md §6, including a transfer tag other than `expected_tag` (checked, like every header
// problem, before anything is written); never writes outside the regions nor reads past payload_len.
void decode(const uint8_t* payload, uint64_t payload_len, const DstRegion* regions, size_t n_regions, int dtype,
            uint64_t expected_tag = 0);

// SIMD level in use: 0 = portable scalar, 1 = AVX-512 (BW+VBMI+VNNI). set_simd_level clamps to what the CPU
// supports and returns the level now in effect (tests use it to check that both paths write the same bytes).
int simd_level();
int set_simd_level(int level);
int max_simd_level();

}  // namespace cpu
}  // namespace splitzip
