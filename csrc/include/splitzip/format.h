// SplitZip-KV wire format v2 (reads v1 too) -- the single C++/CUDA twin of docs/FORMAT.md and
// splitzip_vllm/codec/format.py (tests/test_format_constants.py keeps them in sync).
//
// Everything in this header is usable from host C++ and from CUDA device code (SZ_HD): only <cstdint>/<cstddef>,
// no exceptions, no std::string. It is the ONE header writer (pack_header) and the ONE validator
// (validate_header, check_destination, check_escape) of every C++ and CUDA codec; they return SzStatus codes,
// whose messages live in one place, splitzip_vllm/codec/format.py (Status / STATUS_MESSAGES).
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define SZ_HD __host__ __device__ inline
#else
#define SZ_HD inline
#endif

// Decode verdicts (FORMAT.md §6), numbered in the order of the checks: when several problems are present the
// lowest code is reported. Python twin: splitzip_vllm/codec/format.py Status (tests/test_format_constants.py).
enum SzStatus {
  SZ_OK = 0,
  SZ_ERR_TRUNCATED_HEADER = 1,   // buffer shorter than 64 bytes, or than the 96 of a version-2 header
  SZ_ERR_MAGIC = 2,
  SZ_ERR_VERSION = 3,            // neither 1 nor 2
  SZ_ERR_HEADER_CRC = 4,
  SZ_ERR_DTYPE = 5,              // unknown dtype code
  SZ_ERR_RESERVED = 6,
  SZ_ERR_RAW_FIELDS = 7,
  SZ_ERR_RAW_BODY = 8,
  SZ_ERR_EXP4_DTYPE = 9,
  SZ_ERR_CODE_BITS = 10,
  SZ_ERR_N_CODES = 11,
  SZ_ERR_CHUNK_LOG2 = 12,
  SZ_ERR_ESCAPES_GT_N = 13,
  SZ_ERR_CODEBOOK = 14,
  SZ_ERR_EXP4_BODY = 15,
  SZ_ERR_MODE = 16,              // unknown mode
  SZ_ERR_EXT = 17,               // non-zero ext area (version 2)
  SZ_ERR_TAG = 18,               // version 2: transfer tag differs from the expected one (FORMAT.md §6a)
  SZ_ERR_TAG_V1 = 19,            // version 1 (implicit tag 0) but a non-zero tag is expected
  SZ_ERR_TRUNCATED_BODY = 20,    // buffer shorter than header bytes + body_bytes
  SZ_ERR_DST_DTYPE = 21,         // destination dtype differs from the header's
  SZ_ERR_DST_COUNT = 22,         // destination element count differs from the header's
  SZ_ERR_ESC_SUM = 23,           // chunk counts do not sum to n_escapes (aux = their sum)
  SZ_ERR_ESC_COUNT = 24,         // a chunk count exceeds its chunk length
  SZ_ERR_ESC_POS = 25,           // an escape position lies outside its chunk
  SZ_ERR_ESC_ORDER = 26,         // escape positions of a chunk are not strictly increasing
  SZ_ERR_CHECKSUM = 27,          // decoded data does not match checksum_a / checksum_b
  // EXP2L (FORMAT.md §3a, §6), appended so the codes above keep their numbers
  SZ_ERR_EXP2L_VERSION = 28,     // header: EXP2L in a version-1 header
  SZ_ERR_SEC_N_CODES = 29,       // header: n_sec_codes > 15
  SZ_ERR_SEC_BYTES_GT_N = 30,    // header: sec_bytes > n_elems
  SZ_ERR_SEC_COUNT = 31,         // a secondary count exceeds its chunk length
  SZ_ERR_SEC_BYTES = 32,         // the secondary counts need another byte count than sec_bytes (aux = their need)
  SZ_ERR_SEC_MARKERS = 33,       // a chunk's marker codes differ from its secondary count (aux = the chunk)
  SZ_ERR_MODE_UNSUPPORTED = 34,  // a valid EXP2L payload given to a backend without EXP2L kernels
  SZ_NUM_STATUS = 35
};

// The EXP2L statuses that validate_header reports (FORMAT.md §6 steps 1-3; the others are decode checks).
SZ_HD bool is_exp2l_header_status(int s) {
  return s == SZ_ERR_EXP2L_VERSION || s == SZ_ERR_SEC_N_CODES || s == SZ_ERR_SEC_BYTES_GT_N;
}

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
constexpr int kModeExp2l = 2;          // two-level exponent code (FORMAT.md §3a)
constexpr int kExp2lCodeBits = 3;      // primary code width
constexpr int kExp2lMaxPrimary = 7;    // primary entries; primary code 7 is the marker
constexpr int kExp2lMaxSecondary = 15; // secondary entries; secondary code 15 is the escape
constexpr int kExp2lMarker = 7;
constexpr int kExp2lSecEscape = 15;
constexpr int kMaxCodebook = kExp2lMaxPrimary + kExp2lMaxSecondary;  // 22
constexpr int kExtOffNSec = 15;        // ext layout in EXP2L: sec_codebook[15], n_sec_codes (u8), sec_bytes (u64)
constexpr int kExtOffSecBytes = 16;
constexpr int kMinChunkLog2 = 8;
constexpr int kMaxChunkLog2 = 15;
constexpr int kDefaultChunkLog2 = 12;
constexpr int kSectionAlign = 16;
// Escape marker of a 256-entry exponent -> code table (codes are 0..15): bit 7, so the AVX-512 encoder finds
// escapes with one movepi8_mask and the CUDA encoder with one shift; `& 0x0F` turns it into the dense code 0.
// Python/Triton: format.LUT_ESCAPE.
constexpr uint8_t kLutEscape = 0x80;

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
// Bitwise (no table) by default so it works unchanged on host and device; it only ever runs over a header
// (<= 96 bytes). crc32_update(0, ...) == zlib.crc32(...); chain calls with the previous result.
SZ_HD uint32_t crc32_update(uint32_t crc, const uint8_t* data, size_t len) {
  crc = ~crc;
  for (size_t i = 0; i < len; ++i) {
    crc ^= data[i];
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}
SZ_HD uint32_t crc32(const uint8_t* data, size_t len) { return crc32_update(0u, data, len); }

// Entry i of the 256-entry CRC table (as zlib's). A CUDA kernel fills a shared-memory table with one thread per
// entry and passes it as `crc_tab` below: one table step per byte instead of 8 dependent bit steps.
SZ_HD uint32_t crc32_table_entry(uint32_t i) {
  uint32_t c = i;
  for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  return c;
}

// CRC of the `header_bytes` header bytes at hdr (64 or 96) with the CRC field (bytes 12..15) taken as zero.
// crc_tab: optional 256-entry table (crc32_table_entry); same result either way (host_format_test).
SZ_HD uint32_t header_crc(const uint8_t* hdr, int header_bytes, const uint32_t* crc_tab = nullptr) {
  uint32_t c = 0xFFFFFFFFu;
  for (int i = 0; i < header_bytes; ++i) {
    const uint32_t b = (i >= kOffHeaderCrc && i < kOffHeaderCrc + 4) ? 0u : uint32_t(hdr[i]);
    if (crc_tab) {
      c = crc_tab[(c ^ b) & 0xFFu] ^ (c >> 8);
    } else {
      c ^= b;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
  }
  return ~c;
}

// Header length pack_header writes for h.version: 64 for version 1, else 96 (encoders write version 2).
SZ_HD int packed_header_bytes(int version) { return version == kVersionV1 ? kHeaderBytesV1 : kHeaderBytes; }

// THE header writer of every C++ / CUDA encoder: the wire bytes of h (magic, fields as given -- encoders leave
// version/reserved/ext at their defaults --, for a 96-byte header also the transfer tag and ext; header CRC
// computed here, over `crc_tab` when given). Returns the bytes written, packed_header_bytes(h.version); tests
// pack version-1 and invalid headers with it.
SZ_HD int pack_header(const Header& h, uint8_t* out, const uint32_t* crc_tab = nullptr) {
  const int hb = packed_header_bytes(h.version);
  store_u32(out + kOffMagic, kMagicU32);
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
  store_u32(out + kOffHeaderCrc, header_crc(out, hb, crc_tab));
  return hb;
}

// The header an encoder writes (version 2, `tag`): RAW when mode == kModeRaw (coding fields and codebook zero),
// else EXP4 with the first n_codes entries of codebook16.
SZ_HD Header make_header(int dtype, int mode, int n_codes, int chunk_log2, const uint8_t* codebook16, uint64_t n,
                         uint64_t n_escapes, uint64_t body_bytes, uint32_t checksum_a, uint32_t checksum_b,
                         uint64_t tag) {
  Header h;
  const bool exp4 = mode == kModeExp4;
  h.dtype = uint8_t(dtype);
  h.mode = uint8_t(mode);
  h.code_bits = uint8_t(exp4 ? kCodeBits : 0);
  h.n_codes = uint8_t(exp4 ? n_codes : 0);
  h.chunk_log2 = uint8_t(exp4 ? chunk_log2 : 0);
  for (int i = 0; i < 16; ++i) h.codebook[i] = (exp4 && i < n_codes && codebook16) ? codebook16[i] : uint8_t(0);
  h.n_elems = n;
  h.n_escapes = exp4 ? n_escapes : 0;
  h.body_bytes = body_bytes;
  h.checksum_a = checksum_a;
  h.checksum_b = checksum_b;
  h.transfer_tag = tag;
  return h;
}

// The EXP2L header an encoder writes (FORMAT.md §3a; version 2, `tag`): primary table = the first min(7, k) of the
// k = n_codes codebook exponents, secondary table (ext) = the next up to 15, sec_bytes in ext.
SZ_HD Header make_exp2l_header(const uint8_t* codebook, int n_codes, int chunk_log2, uint64_t n, uint64_t n_escapes,
                               uint64_t sec_bytes, uint64_t body_bytes, uint32_t checksum_a, uint32_t checksum_b,
                               uint64_t tag) {
  Header h;
  const int k = n_codes < kMaxCodebook ? n_codes : kMaxCodebook;
  const int p = k < kExp2lMaxPrimary ? k : kExp2lMaxPrimary;
  h.dtype = uint8_t(kDtypeBFloat16);
  h.mode = uint8_t(kModeExp2l);
  h.code_bits = uint8_t(kExp2lCodeBits);
  h.n_codes = uint8_t(p);
  h.chunk_log2 = uint8_t(chunk_log2);
  for (int i = 0; i < p; ++i) h.codebook[i] = codebook[i];
  for (int i = p; i < k; ++i) h.ext[i - p] = codebook[i];
  h.ext[kExtOffNSec] = uint8_t(k - p);
  store_u64(h.ext + kExtOffSecBytes, sec_bytes);
  h.n_elems = n;
  h.n_escapes = n_escapes;
  h.body_bytes = body_bytes;
  h.checksum_a = checksum_a;
  h.checksum_b = checksum_b;
  h.transfer_tag = tag;
  return h;
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

// ---- EXP2L section layout (FORMAT.md §3a) -------------------------------------------------------------------
struct Exp2lLayout {
  uint64_t n;
  int chunk_log2;
  uint64_t n_escapes;
  uint64_t sec_bytes;
  uint64_t n_chunks;
  uint64_t off_codes;
  uint64_t off_scounts;
  uint64_t off_sec;
  uint64_t off_counts;
  uint64_t off_pos;
  uint64_t off_exp;
  uint64_t body_bytes;

  // Same overflow caveat as Exp4Layout; validate.h checks untrusted headers in 128-bit arithmetic first.
  SZ_HD static Exp2lLayout compute(uint64_t n, int chunk_log2, uint64_t n_escapes, uint64_t sec_bytes) {
    Exp2lLayout l;
    l.n = n;
    l.chunk_log2 = chunk_log2;
    l.n_escapes = n_escapes;
    l.sec_bytes = sec_bytes;
    const uint64_t c = uint64_t(1) << chunk_log2;
    l.n_chunks = (n + c - 1) >> chunk_log2;
    l.off_codes = align16(n);
    l.off_scounts = align16(l.off_codes + 24 * ((n + 63) / 64));
    l.off_sec = align16(l.off_scounts + 2 * l.n_chunks);
    l.off_counts = align16(l.off_sec + sec_bytes);
    l.off_pos = align16(l.off_counts + 2 * l.n_chunks);
    l.off_exp = align16(l.off_pos + 2 * n_escapes);
    l.body_bytes = l.off_exp + n_escapes;
    return l;
  }
};

// EXP2L encode table of the CPU and CUDA encoders: one byte per exponent, bits 0..2 the primary code (7 = marker),
// bits 3..6 the secondary code (15 = escape), bit 7 set for markers (a byte-sign mask finds them; an escape's byte
// is 0xFF). `cb`: the codebook's n_codes (<= 22) distinct exponents, most frequent first (FORMAT.md §5).
constexpr uint8_t kExp2lLutMarker = 0x80;
SZ_HD void exp2l_encode_lut(const uint8_t* cb, int n_codes, uint8_t* lut) {
  for (int e = 0; e < 256; ++e) lut[e] = uint8_t(kExp2lLutMarker | kExp2lMarker | (kExp2lSecEscape << 3));
  for (int j = 0; j < n_codes && j < kMaxCodebook; ++j)
    lut[cb[j]] = j < kExp2lMaxPrimary ? uint8_t(j)
                                      : uint8_t(kExp2lLutMarker | kExp2lMarker | ((j - kExp2lMaxPrimary) << 3));
}
// The EXP4 table holds the first min(16, n_codes) exponents (FORMAT.md §5): a marker is an EXP4 escape iff its
// secondary code (15 for an EXP2L escape) is >= this threshold, so an EXP2L encoder counts EXP4's escapes too.
SZ_HD uint32_t exp2l_exp4_sec_threshold(int n_codes) {
  const int t = (n_codes < kMaxCodes ? n_codes : kMaxCodes) - kExp2lMaxPrimary;
  return uint32_t(t > 0 ? t : 0);
}

// EXP2L header ext accessors (FORMAT.md §3a)
SZ_HD int exp2l_n_sec(const Header& h) { return h.ext[kExtOffNSec]; }
SZ_HD uint64_t exp2l_sec_bytes(const Header& h) { return load_u64(h.ext + kExtOffSecBytes); }

// ---- per-element bit logic (FORMAT.md §3) ----------------------------------------------------------------------
SZ_HD uint32_t exponent_of(uint16_t x) { return (uint32_t(x) >> 7) & 0xFFu; }
SZ_HD uint32_t sm_of(uint16_t x) { return ((uint32_t(x) >> 8) & 0x80u) | (uint32_t(x) & 0x7Fu); }
SZ_HD uint16_t combine(uint32_t sm, uint32_t e) {
  return uint16_t(((sm & 0x80u) << 8) | ((e & 0xFFu) << 7) | (sm & 0x7Fu));
}

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


// ---- validation (FORMAT.md §6): THE validator of every C++ / CUDA decoder -------------------------------------
// Each function returns SZ_OK or the SzStatus of the first failing check; messages are formatted in Python.
namespace detail {
__extension__ typedef unsigned __int128 u128;

SZ_HD u128 align16_wide(u128 x) { return (x + 15) & ~u128(15); }

// FORMAT.md §3 body length without 64-bit overflow, for untrusted header fields.
SZ_HD u128 exp4_body_bytes_wide(uint64_t n, int chunk_log2, uint64_t m) {
  const u128 c = u128(1) << chunk_log2;
  const u128 n_chunks = (u128(n) + c - 1) >> chunk_log2;
  const u128 off_codes = align16_wide(n);
  const u128 off_counts = align16_wide(off_codes + (u128(n) + 1) / 2);
  const u128 off_pos = align16_wide(off_counts + 2 * n_chunks);
  const u128 off_exp = align16_wide(off_pos + 2 * u128(m));
  return off_exp + m;
}

SZ_HD u128 exp2l_body_bytes_wide(uint64_t n, int chunk_log2, uint64_t m, uint64_t sec_bytes) {
  const u128 c = u128(1) << chunk_log2;
  const u128 n_chunks = (u128(n) + c - 1) >> chunk_log2;
  const u128 off_codes = align16_wide(n);
  const u128 off_scounts = align16_wide(off_codes + 24 * ((u128(n) + 63) / 64));
  const u128 off_sec = align16_wide(off_scounts + 2 * n_chunks);
  const u128 off_counts = align16_wide(off_sec + sec_bytes);
  const u128 off_pos = align16_wide(off_counts + 2 * n_chunks);
  const u128 off_exp = align16_wide(off_pos + 2 * u128(m));
  return off_exp + m;
}

// EXP4 / EXP2L coding fields (FORMAT.md §6 step 2; the order of format.py _check_coded).
SZ_HD int validate_coded_fields(const Header& h) {
  const bool two = h.mode == kModeExp2l;
  if (!dtype_exp4_allowed(h.dtype)) return SZ_ERR_EXP4_DTYPE;
  if (two && h.version != kVersion) return SZ_ERR_EXP2L_VERSION;
  if (h.code_bits != (two ? kExp2lCodeBits : kCodeBits)) return SZ_ERR_CODE_BITS;
  if (h.n_codes < 1 || h.n_codes > (two ? kExp2lMaxPrimary : kMaxCodes)) return SZ_ERR_N_CODES;
  if (h.chunk_log2 < kMinChunkLog2 || h.chunk_log2 > kMaxChunkLog2) return SZ_ERR_CHUNK_LOG2;
  if (h.n_escapes > h.n_elems) return SZ_ERR_ESCAPES_GT_N;
  const int n_sec = two ? exp2l_n_sec(h) : 0;
  if (n_sec > kExp2lMaxSecondary) return SZ_ERR_SEC_N_CODES;
  // primary (codebook) then secondary (ext) entries: the first n_codes / n_sec distinct across both, others 0
  bool bad = false;
  for (int i = 0; i < 16 + (two ? kExp2lMaxSecondary : 0); ++i) {
    const bool prim = i < 16;
    const int k = prim ? i : i - 16;
    const uint8_t v = prim ? h.codebook[k] : h.ext[k];
    if (k < (prim ? int(h.n_codes) : n_sec)) {
      for (int j = 0; j < i; ++j) {
        const bool pj = j < 16;
        const int kj = pj ? j : j - 16;
        if (kj < (pj ? int(h.n_codes) : n_sec)) bad |= (pj ? h.codebook[kj] : h.ext[kj]) == v;
      }
    } else {
      bad |= v != 0;
    }
  }
  if (bad) return SZ_ERR_CODEBOOK;
  if (two) {
    const uint64_t sb = exp2l_sec_bytes(h);
    if (sb > h.n_elems) return SZ_ERR_SEC_BYTES_GT_N;
    if (u128(h.body_bytes) != exp2l_body_bytes_wide(h.n_elems, h.chunk_log2, h.n_escapes, sb)) return SZ_ERR_EXP4_BODY;
  } else if (u128(h.body_bytes) != exp4_body_bytes_wide(h.n_elems, h.chunk_log2, h.n_escapes)) {
    return SZ_ERR_EXP4_BODY;
  }
  return SZ_OK;
}

// FORMAT.md §6 step 2 after the CRC: dtype, reserved field, mode and the mode's field combination, ext. Sizes are
// compared in 128-bit arithmetic (untrusted fields near 2^64); once the header passes, body_bytes <= available -
// header bytes bounds every 64-bit size computed from it.
SZ_HD int validate_fields(const Header& h) {
  if (!dtype_known(h.dtype)) return SZ_ERR_DTYPE;
  if (h.reserved != 0) return SZ_ERR_RESERVED;
  if (h.mode == kModeRaw) {
    bool cb_set = false;
    for (int i = 0; i < 16; ++i) cb_set |= h.codebook[i] != 0;
    if (h.code_bits || h.n_codes || h.chunk_log2 || h.n_escapes || cb_set) return SZ_ERR_RAW_FIELDS;
    if (u128(h.body_bytes) != u128(h.n_elems) * uint64_t(dtype_elem_size(h.dtype))) return SZ_ERR_RAW_BODY;
  } else if (h.mode == kModeExp4 || h.mode == kModeExp2l) {
    const int st = validate_coded_fields(h);
    if (st != SZ_OK || h.mode == kModeExp2l) return st;  // EXP2L: ext holds its fields
  } else {
    return SZ_ERR_MODE;
  }
  bool ext_set = false;
  for (int i = 0; i < kExtBytes; ++i) ext_set |= h.ext[i] != 0;
  return ext_set ? SZ_ERR_EXT : SZ_OK;
}
}  // namespace detail

// FORMAT.md §6 steps 1-3 for the header alone (versions 1 and 2, transfer tag of §6a included). `hdr` must hold
// min(available, 96) readable bytes (nothing is read past them); `available` is the payload buffer length,
// `expected_tag` the tag the caller expects, `crc_tab` an optional CRC table (crc32_table_entry). Returns SZ_OK
// and fills *out, or the status of the first failing check (the order of splitzip_vllm/codec/format.py).
SZ_HD int validate_header(const uint8_t* hdr, uint64_t available, uint64_t expected_tag, Header* out,
                          const uint32_t* crc_tab = nullptr) {
  if (available < uint64_t(kHeaderBytesV1)) return SZ_ERR_TRUNCATED_HEADER;
  if (load_u32(hdr + kOffMagic) != kMagicU32) return SZ_ERR_MAGIC;
  const int hb = header_bytes_of(hdr[kOffVersion]);
  if (hb == 0) return SZ_ERR_VERSION;
  if (available < uint64_t(hb)) return SZ_ERR_TRUNCATED_HEADER;
  Header h;
  (void)parse_header(hdr, &h);  // reads hb bytes
  if (header_crc(hdr, hb, crc_tab) != h.header_crc32) return SZ_ERR_HEADER_CRC;
  const int st = detail::validate_fields(h);
  if (st != SZ_OK) return st;
  if (h.transfer_tag != expected_tag) return h.version == kVersionV1 ? SZ_ERR_TAG_V1 : SZ_ERR_TAG;
  if (available - uint64_t(hb) < h.body_bytes) return SZ_ERR_TRUNCATED_BODY;
  if (out) *out = h;
  return SZ_OK;
}

// FORMAT.md §6 step 3, the destination: its dtype code and element count must be the header's.
SZ_HD int check_destination(const Header& h, int dtype, uint64_t n_elems) {
  if (int(h.dtype) != dtype) return SZ_ERR_DST_DTYPE;
  if (h.n_elems != n_elems) return SZ_ERR_DST_COUNT;
  return SZ_OK;
}

// FORMAT.md §6 step 4, one escape: position `pos` inside its chunk of `chunk_len` elements and, unless it is the
// chunk's first escape, strictly after the previous escape's position `prev` (so no element is patched twice).
SZ_HD int check_escape(uint32_t pos, bool first_in_chunk, uint32_t prev, uint64_t chunk_len) {
  if (uint64_t(pos) >= chunk_len) return SZ_ERR_ESC_POS;
  if (!first_in_chunk && pos <= prev) return SZ_ERR_ESC_ORDER;
  return SZ_OK;
}

}  // namespace splitzip
