// Host-only header validation of format versions 1 and 2 (FORMAT.md §6 steps 1-3, §6a) with error messages
// matching splitzip_vllm/codec/format.py. Shared by the CPU and CUDA bindings.
#pragma once

#include <cstdint>
#include <string>

#include "splitzip/format.h"

namespace splitzip {

namespace detail {
__extension__ typedef unsigned __int128 u128;

inline std::string u128_str(u128 v) {
  if (v == 0) return "0";
  std::string s;
  while (v) {
    s.insert(s.begin(), char('0' + int(v % 10)));
    v /= 10;
  }
  return s;
}

inline u128 align16_wide(u128 x) { return (x + 15) & ~u128(15); }

// FORMAT.md §3 body length without 64-bit overflow, for untrusted header fields.
inline u128 exp4_body_bytes_wide(uint64_t n, int chunk_log2, uint64_t m) {
  const u128 c = u128(1) << chunk_log2;
  const u128 n_chunks = (u128(n) + c - 1) / c;
  const u128 off_codes = align16_wide(n);
  const u128 off_counts = align16_wide(off_codes + (u128(n) + 1) / 2);
  const u128 off_pos = align16_wide(off_counts + 2 * n_chunks);
  const u128 off_exp = align16_wide(off_pos + 2 * u128(m));
  return off_exp + m;
}

inline std::string hex_tag(uint64_t v) {
  static const char* hex = "0123456789abcdef";
  std::string s = "0x";
  for (int i = 15; i >= 0; --i) s += hex[(v >> (4 * i)) & 15];
  return s;
}

inline std::string magic_message(const uint8_t* hdr) {
  std::string m = "not a splitzip payload: magic b'";
  static const char* hex = "0123456789abcdef";
  for (int i = 0; i < 4; ++i) {
    uint8_t c = hdr[i];
    if (c >= 32 && c < 127 && c != '\\' && c != '\'') {
      m += char(c);
    } else {
      m += "\\x";
      m += hex[c >> 4];
      m += hex[c & 15];
    }
  }
  return m + "', expected b'SZKV'";
}

// FORMAT.md §6 step 2 after the CRC: dtype, reserved field, mode and the mode's field combination, ext.
inline std::string validate_fields(const Header& h) {
  if (!dtype_known(h.dtype)) return "payload header names unknown dtype code " + std::to_string(h.dtype);
  if (h.reserved != 0) return "payload header has non-zero reserved field";
  const uint64_t esize = uint64_t(dtype_elem_size(h.dtype));
  // Sizes are compared in 128-bit arithmetic: header fields are untrusted and may be near 2^64. Once the
  // header passes, body_bytes <= available - header bytes bounds n_elems, so callers' 64-bit size arithmetic is
  // safe.
  if (h.mode == kModeRaw) {
    bool cb_set = false;
    for (int i = 0; i < 16; ++i) cb_set |= h.codebook[i] != 0;
    if (h.code_bits || h.n_codes || h.chunk_log2 || h.n_escapes || cb_set)
      return "RAW payload header has coding fields set";
    const u128 need = u128(h.n_elems) * esize;
    if (u128(h.body_bytes) != need)
      return "RAW payload body is " + std::to_string(h.body_bytes) + " bytes but " + std::to_string(h.n_elems) +
             " elements of size " + std::to_string(esize) + " need " + u128_str(need);
  } else if (h.mode == kModeExp4) {
    if (!dtype_exp4_allowed(h.dtype))
      return "EXP4 coding is not defined for dtype code " + std::to_string(h.dtype);
    if (h.code_bits != kCodeBits)
      return "unsupported code width " + std::to_string(h.code_bits) + " bits (this build reads " +
             std::to_string(kCodeBits) + ")";
    if (h.n_codes < 1 || h.n_codes > kMaxCodes)
      return "codebook size " + std::to_string(h.n_codes) + " outside 1.." + std::to_string(kMaxCodes);
    if (h.chunk_log2 < kMinChunkLog2 || h.chunk_log2 > kMaxChunkLog2)
      return "chunk_log2 " + std::to_string(h.chunk_log2) + " outside " + std::to_string(kMinChunkLog2) + ".." +
             std::to_string(kMaxChunkLog2);
    if (h.n_escapes > h.n_elems)
      return std::to_string(h.n_escapes) + " escapes for only " + std::to_string(h.n_elems) + " elements";
    bool seen[256] = {false};
    bool bad = false;
    for (int i = 0; i < 16; ++i) {
      if (i < h.n_codes) {
        bad |= seen[h.codebook[i]];
        seen[h.codebook[i]] = true;
      } else {
        bad |= h.codebook[i] != 0;
      }
    }
    if (bad) return "payload codebook is malformed (duplicate or stray entries)";
    if (u128(h.body_bytes) != exp4_body_bytes_wide(h.n_elems, h.chunk_log2, h.n_escapes))
      return "payload body length does not match its element and escape counts";
  } else {
    return "unknown payload mode " + std::to_string(h.mode);
  }
  bool ext_set = false;
  for (int i = 0; i < kExtBytes; ++i) ext_set |= h.ext[i] != 0;
  if (ext_set) return "payload header has non-zero ext field (reserved for later modes)";
  return std::string();
}
}  // namespace detail

// Why a payload of transfer `tag` (format `version`) is refused where `expected` is (FORMAT.md §6a); the text of
// splitzip_vllm/codec/format.py tag_mismatch_message.
inline std::string tag_mismatch_message(int version, uint64_t tag, uint64_t expected) {
  if (version == kVersionV1)
    return "format v1 payloads carry no transfer tag (implicit tag " + detail::hex_tag(0) +
           "), but this decode expects transfer tag " + detail::hex_tag(expected) +
           ": upgrade splitzip-vllm on the sending side";
  return "payload belongs to another transfer: its transfer tag is " + detail::hex_tag(tag) + ", expected " +
         detail::hex_tag(expected) +
         " (another request, layer or an older allocation: a read after the prefill's lease expired?)";
}

// Validates a header of version 1 or 2 at `hdr` (FORMAT.md §6 steps 1-3 for the header alone; reads at most
// min(available, 96) bytes). Returns "" when valid, otherwise the problem. `available` is the payload buffer
// length in bytes; `expected_tag` the transfer tag the caller expects (FORMAT.md §6a).
inline std::string validate_header(const uint8_t* hdr, uint64_t available, uint64_t expected_tag, Header* out) {
  if (available < uint64_t(kHeaderBytesV1))
    return "payload truncated: " + std::to_string(available) + " bytes, the header alone needs " +
           std::to_string(kHeaderBytesV1);
  if (load_u32(hdr + kOffMagic) != kMagicU32) return detail::magic_message(hdr);
  const int version = hdr[kOffVersion];
  const int hb = header_bytes_of(version);
  if (hb == 0)
    return "unsupported splitzip format version " + std::to_string(version) + "; this build reads versions " +
           std::to_string(kVersionV1) + " and " + std::to_string(kVersion) +
           " (upgrade splitzip-vllm on both prefill and decode)";
  if (available < uint64_t(hb))
    return "payload truncated: " + std::to_string(available) + " bytes, the header alone needs " +
           std::to_string(hb);
  Header h;
  parse_header(hdr, &h);
  if (header_crc(hdr, hb) != h.header_crc32) return "payload header is corrupted (header CRC mismatch)";
  const std::string err = detail::validate_fields(h);
  if (!err.empty()) return err;
  if (h.transfer_tag != expected_tag) return tag_mismatch_message(version, h.transfer_tag, expected_tag);
  if (available - uint64_t(hb) < h.body_bytes)
    return "payload truncated: " + std::to_string(available) + " bytes, header says " +
           std::to_string(uint64_t(hb) + h.body_bytes);
  if (out) *out = h;
  return std::string();
}

}  // namespace splitzip
