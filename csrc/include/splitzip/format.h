// SplitZip-KV wire format v2 (reads v1 too) -- the single C++/CUDA twin of docs/FORMAT.md and
// splitzip_vllm/codec/format.py (tests/test_format_constants.py keeps them in sync).
//
// Everything in this header is usable from host C++ and from CUDA device code: only <cstdint>/<cstddef>,
// no exceptions, no std::string. Host-only validation with error messages lives in validate.h.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define SZ_HD __host__ __device__ inline
#else
#define SZ_HD inline
#endif

namespace splitzip {

// ---- constants (FORMAT.md §1-§5) ---------------------------------------------------------------------------
constexpr uint8_t kMagic[4] = {0x53, 0x5A, 0x4B, 0x56};  // "SZKV" (host code; device code uses kMagicU32)
constexpr uint32_t kMagicU32 = 0x564B5A53u;               // the 4 magic bytes read as little-endian u32
constexpr int kVersion = 2;          // what encoders write
constexpr int kVersionV1 = 1;        // still read: 64-byte header, implicit transfer tag 0 (FORMAT.md §6a, §8)
constexpr int kHeaderBytes = 96;     // header of a version-2 payload (what encoders write)
constexpr int kHeaderBytesV1 = 64;   // header of a version-1 payload
constexpr int kExtBytes = 24;        // the zero `ext` area (version 2)
constexpr int kCapacitySlack = 64;
constexpr int kModeRaw = 0;
constexpr int kModeExp4 = 1;
constexpr int kCodeBits = 4;
constexpr int kMaxCodes = 16;
constexpr int kMinChunkLog2 = 8;
constexpr int kMaxChunkLog2 = 15;
constexpr int kDefaultChunkLog2 = 12;
constexpr int kSectionAlign = 16;

// dtype codes (FORMAT.md §2)
constexpr int kDtypeUint8 = 0;
constexpr int kDtypeBFloat16 = 1;
constexpr int kDtypeFloat16 = 2;
constexpr int kDtypeFloat32 = 3;
constexpr int kDtypeFloat8E4M3FN = 4;
constexpr int kDtypeFloat8E5M2 = 5;
constexpr int kNumDtypes = 6;

// header field offsets (FORMAT.md §1)
constexpr int kOffMagic = 0;
constexpr int kOffVersion = 4;
constexpr int kOffDtype = 5;
constexpr int kOffMode = 6;
constexpr int kOffCodeBits = 7;
constexpr int kOffNCodes = 8;
constexpr int kOffChunkLog2 = 9;
constexpr int kOffReserved = 10;
constexpr int kOffHeaderCrc = 12;
constexpr int kOffCodebook = 16;
constexpr int kOffNElems = 32;
constexpr int kOffNEscapes = 40;
constexpr int kOffBodyBytes = 48;
constexpr int kOffChecksumA = 56;
constexpr int kOffChecksumB = 60;
constexpr int kOffTransferTag = 64;  // version 2 only
constexpr int kOffExt = 72;          // version 2 only

// element size of a dtype code, 0 for an unknown code
SZ_HD int dtype_elem_size(int code) {
  switch (code) {
    case kDtypeUint8: return 1;
    case kDtypeBFloat16: return 2;
    case kDtypeFloat16: return 2;
    case kDtypeFloat32: return 4;
    case kDtypeFloat8E4M3FN: return 1;
    case kDtypeFloat8E5M2: return 1;
    default: return 0;
  }
}
// header length of a payload of `version` (1 or 2), 0 for an unknown version
SZ_HD int header_bytes_of(int version) {
  return version == kVersion ? kHeaderBytes : version == kVersionV1 ? kHeaderBytesV1 : 0;
}
SZ_HD bool dtype_known(int code) { return code >= 0 && code < kNumDtypes; }
SZ_HD bool dtype_exp4_allowed(int code) { return code == kDtypeBFloat16; }

SZ_HD uint64_t align16(uint64_t x) { return (x + (kSectionAlign - 1)) & ~uint64_t(kSectionAlign - 1); }
SZ_HD uint64_t encode_capacity(uint64_t n_elems, uint64_t elem_size) {
  return uint64_t(kHeaderBytes) + n_elems * elem_size + uint64_t(kCapacitySlack);
}

// ---- header --------------------------------------------------------------------------------------------------
// In-memory form of the header (96 bytes in version 2; version 1 is its first 64 bytes, without tag and ext).
// Use pack_header()/parse_header() for the wire bytes (explicit little-endian, independent of struct layout); the
// packed struct mirrors the version-2 wire layout on little-endian hosts.
#pragma pack(push, 1)
struct HeaderWire {
  uint8_t magic[4];
  uint8_t version;
  uint8_t dtype;
  uint8_t mode;
  uint8_t code_bits;
  uint8_t n_codes;
  uint8_t chunk_log2;
  uint16_t reserved;
  uint32_t header_crc32;
  uint8_t codebook[16];
  uint64_t n_elems;
  uint64_t n_escapes;
  uint64_t body_bytes;
  uint32_t checksum_a;
  uint32_t checksum_b;
  uint64_t transfer_tag;
  uint8_t ext[kExtBytes];
};
#pragma pack(pop)
static_assert(sizeof(HeaderWire) == kHeaderBytes, "header must be 96 bytes");

struct Header {
  uint8_t version = kVersion;
  uint8_t dtype = 0;
  uint8_t mode = 0;
  uint8_t code_bits = 0;
  uint8_t n_codes = 0;
  uint8_t chunk_log2 = 0;
  uint16_t reserved = 0;
  uint32_t header_crc32 = 0;  // as read by parse(); pack() computes it
  uint8_t codebook[16] = {0};
  uint64_t n_elems = 0;
  uint64_t n_escapes = 0;
  uint64_t body_bytes = 0;
  uint32_t checksum_a = 0;
  uint32_t checksum_b = 0;
  uint64_t transfer_tag = 0;  // version 1: 0 (implicit)
  uint8_t ext[kExtBytes] = {0};
};

SZ_HD void store_u16(uint8_t* p, uint16_t v) { p[0] = uint8_t(v); p[1] = uint8_t(v >> 8); }
SZ_HD void store_u32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = uint8_t(v >> (8 * i));
}
SZ_HD void store_u64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = uint8_t(v >> (8 * i));
}
SZ_HD uint16_t load_u16(const uint8_t* p) { return uint16_t(p[0] | (uint16_t(p[1]) << 8)); }
SZ_HD uint32_t load_u32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
SZ_HD uint64_t load_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// ---- CRC-32 (zlib / IEEE 802.3, reflected polynomial 0xEDB88320) ------------------------------------------------
// Bitwise (no table) so it works unchanged on host and device; it only ever runs over a header (<= 96 bytes).
// crc32_update(0, ...) == zlib.crc32(...); chain calls with the previous result.
SZ_HD uint32_t crc32_update(uint32_t crc, const uint8_t* data, size_t len) {
  crc = ~crc;
  for (size_t i = 0; i < len; ++i) {
    crc ^= data[i];
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}
SZ_HD uint32_t crc32(const uint8_t* data, size_t len) { return crc32_update(0u, data, len); }

// CRC of the `header_bytes` header bytes at hdr (64 or 96) with the CRC field (bytes 12..15) taken as zero.
SZ_HD uint32_t header_crc(const uint8_t* hdr, int header_bytes) {
  const uint8_t zero4[4] = {0, 0, 0, 0};
  uint32_t c = crc32_update(0u, hdr, kOffHeaderCrc);
  c = crc32_update(c, zero4, 4);
  return crc32_update(c, hdr + kOffHeaderCrc + 4, size_t(header_bytes - kOffHeaderCrc - 4));
}

// Header length pack_header writes for h.version: 64 for version 1, else 96 (encoders write version 2).
SZ_HD int packed_header_bytes(int version) { return version == kVersionV1 ? kHeaderBytesV1 : kHeaderBytes; }

// Write the wire bytes of h (magic, fields as given -- encoders leave version/reserved/ext at their defaults --,
// for a 96-byte header also the transfer tag and ext; header CRC computed here). Returns the bytes written,
// packed_header_bytes(h.version); tests pack version-1 and invalid headers with it.
SZ_HD int pack_header(const Header& h, uint8_t* out) {
  const int hb = packed_header_bytes(h.version);
  for (int i = 0; i < 4; ++i) out[kOffMagic + i] = uint8_t(kMagicU32 >> (8 * i));
  out[kOffVersion] = h.version;
  out[kOffDtype] = h.dtype;
  out[kOffMode] = h.mode;
  out[kOffCodeBits] = h.code_bits;
  out[kOffNCodes] = h.n_codes;
  out[kOffChunkLog2] = h.chunk_log2;
  store_u16(out + kOffReserved, h.reserved);
  store_u32(out + kOffHeaderCrc, 0u);
  for (int i = 0; i < 16; ++i) out[kOffCodebook + i] = h.codebook[i];
  store_u64(out + kOffNElems, h.n_elems);
  store_u64(out + kOffNEscapes, h.n_escapes);
  store_u64(out + kOffBodyBytes, h.body_bytes);
  store_u32(out + kOffChecksumA, h.checksum_a);
  store_u32(out + kOffChecksumB, h.checksum_b);
  if (hb == kHeaderBytes) {
    store_u64(out + kOffTransferTag, h.transfer_tag);
    for (int i = 0; i < kExtBytes; ++i) out[kOffExt + i] = h.ext[i];
  }
  store_u32(out + kOffHeaderCrc, header_crc(out, hb));
  return hb;
}

// Read the fields of a header (no validation; see validate.h): bytes 0..63, and for version 2 (byte 4) also
// the transfer tag and ext, so `in` must hold header_bytes_of(in[4]) readable bytes (64 otherwise).
// Returns false if the magic differs.
SZ_HD bool parse_header(const uint8_t* in, Header* h) {
  h->version = in[kOffVersion];
  h->dtype = in[kOffDtype];
  h->mode = in[kOffMode];
  h->code_bits = in[kOffCodeBits];
  h->n_codes = in[kOffNCodes];
  h->chunk_log2 = in[kOffChunkLog2];
  h->reserved = load_u16(in + kOffReserved);
  h->header_crc32 = load_u32(in + kOffHeaderCrc);
  for (int i = 0; i < 16; ++i) h->codebook[i] = in[kOffCodebook + i];
  h->n_elems = load_u64(in + kOffNElems);
  h->n_escapes = load_u64(in + kOffNEscapes);
  h->body_bytes = load_u64(in + kOffBodyBytes);
  h->checksum_a = load_u32(in + kOffChecksumA);
  h->checksum_b = load_u32(in + kOffChecksumB);
  const bool v2 = h->version == kVersion;
  h->transfer_tag = v2 ? load_u64(in + kOffTransferTag) : 0;
  for (int i = 0; i < kExtBytes; ++i) h->ext[i] = v2 ? in[kOffExt + i] : uint8_t(0);
  return load_u32(in + kOffMagic) == kMagicU32;
}

// ---- EXP4 section layout (FORMAT.md §3) --------------------------------------------------------------------
struct Exp4Layout {
  uint64_t n;
  int chunk_log2;
  uint64_t n_escapes;
  uint64_t n_chunks;
  uint64_t off_codes;
  uint64_t off_counts;
  uint64_t off_pos;
  uint64_t off_exp;
  uint64_t body_bytes;

  // Callers validating untrusted headers must first check n_escapes <= n and that n is small enough that
  // 4*n does not overflow (any n whose payload fits in memory is).
  SZ_HD static Exp4Layout compute(uint64_t n, int chunk_log2, uint64_t n_escapes) {
    Exp4Layout l;
    l.n = n;
    l.chunk_log2 = chunk_log2;
    l.n_escapes = n_escapes;
    const uint64_t c = uint64_t(1) << chunk_log2;
    l.n_chunks = (n + c - 1) >> chunk_log2;
    l.off_codes = align16(n);
    l.off_counts = align16(l.off_codes + (n + 1) / 2);
    l.off_pos = align16(l.off_counts + 2 * l.n_chunks);
    l.off_exp = align16(l.off_pos + 2 * n_escapes);
    l.body_bytes = l.off_exp + n_escapes;
    return l;
  }
};

// ---- per-element bit logic (FORMAT.md §3) ----------------------------------------------------------------------
SZ_HD uint32_t exponent_of(uint16_t x) { return (uint32_t(x) >> 7) & 0xFFu; }
SZ_HD uint32_t sm_of(uint16_t x) { return ((uint32_t(x) >> 8) & 0x80u) | (uint32_t(x) & 0x7Fu); }
SZ_HD uint16_t combine(uint32_t sm, uint32_t e) {
  return uint16_t(((sm & 0x80u) << 8) | ((e & 0xFFu) << 7) | (sm & 0x7Fu));
}

// Escape marker in a 256-entry exponent->code table.
constexpr uint8_t kEscapeCode = 0xFF;

// ---- content checksum (FORMAT.md §4) ---------------------------------------------------------------------------
// A = sum b_k, B = sum (k+1) b_k (mod 2^32). A block of bytes starting at byte offset `base` with local sums
// (A_l, B_l) (B_l using local weights k_l + 1) contributes A_l to A and B_l + base*A_l to B.
struct Checksum {
  uint32_t a = 0;
  uint32_t b = 0;
  SZ_HD void add_block(uint64_t base, uint32_t a_local, uint32_t b_local) {
    a += a_local;
    b += b_local + uint32_t(base) * a_local;
  }
};

}  // namespace splitzip
