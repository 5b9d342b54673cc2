// Thin torch extension `splitzip_vllm._C_cpu` over csrc/cpu/splitzip_cpu.{h,cpp}.
//
// Errors: payload problems raise RuntimeError "splitzip.PayloadError: <status> <aux>" (an SzStatus of
// splitzip/format.h; the Python backend re-raises it as splitzip_vllm.codec.format.PayloadError with the message
// of format.py's status table); argument problems raise ValueError.
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "../cpu/splitzip_cpu.h"
#include "splitzip/format.h"

namespace py = pybind11;
namespace sz = splitzip;

namespace {

const char* kPayloadMarker = "splitzip.PayloadError: ";

[[noreturn]] void value_error(const std::string& m) { throw py::value_error(m); }

void check_cpu_contig(const at::Tensor& t, const char* what, size_t i) {
  if (!t.device().is_cpu())
    value_error(std::string(what) + " " + std::to_string(i) + " is on " + t.device().str() +
                ", the cpu backend needs CPU tensors");
  if (!t.is_contiguous())
    value_error(std::string(what) + " " + std::to_string(i) + " is not contiguous (pass .contiguous() views)");
}

void check_elem_size(const at::Tensor& t, int dtype_code, const char* what, size_t i) {
  const int es = sz::dtype_elem_size(dtype_code);
  if (es == 0) value_error("unknown dtype code " + std::to_string(dtype_code));
  if (int(t.element_size()) != es)
    value_error(std::string(what) + " " + std::to_string(i) + " has element size " +
                std::to_string(t.element_size()) + " but dtype code " + std::to_string(dtype_code) +
                " has element size " + std::to_string(es));
}

// codebook: None, bytes/bytearray (its first n_codes entries), a uint8 tensor, or a list/tuple of ints.
std::vector<uint8_t> codebook_bytes(const py::object& obj, int64_t n_codes) {
  std::vector<uint8_t> cb;
  if (obj.is_none() || n_codes == 0) return cb;
  if (n_codes < 0 || n_codes > sz::kMaxCodebook)
    value_error("n_codes must be in 0.." + std::to_string(sz::kMaxCodebook) + ", got " + std::to_string(n_codes));
  if (py::isinstance<py::bytes>(obj) || py::isinstance<py::bytearray>(obj)) {
    std::string s = py::isinstance<py::bytes>(obj) ? std::string(py::reinterpret_borrow<py::bytes>(obj))
                                                    : std::string(py::reinterpret_borrow<py::bytearray>(obj));
    cb.assign(s.begin(), s.end());
  } else if (THPVariable_Check(obj.ptr())) {
    at::Tensor t = THPVariable_Unpack(obj.ptr()).to(at::kCPU).contiguous().to(at::kByte);
    cb.assign(t.data_ptr<uint8_t>(), t.data_ptr<uint8_t>() + t.numel());
  } else {
    for (auto v : obj) {
      const int64_t e = v.cast<int64_t>();
      if (e < 0 || e > 255) value_error("codebook exponents must be 0..255");
      cb.push_back(uint8_t(e));
    }
  }
  if (int64_t(cb.size()) < n_codes)
    value_error("codebook has " + std::to_string(cb.size()) + " entries, n_codes is " + std::to_string(n_codes));
  cb.resize(size_t(n_codes));
  return cb;
}

int64_t encode_into(const std::vector<at::Tensor>& regions, int64_t dtype_code, const py::object& codebook,
                    int64_t n_codes, int64_t chunk_log2, at::Tensor out, uint64_t tag, bool two_level) {
  std::vector<sz::cpu::SrcRegion> src;
  src.reserve(regions.size());
  for (size_t i = 0; i < regions.size(); ++i) {
    const at::Tensor& r = regions[i];
    check_cpu_contig(r, "region", i);
    check_elem_size(r, int(dtype_code), "region", i);
    src.push_back({static_cast<const uint8_t*>(r.data_ptr()), uint64_t(r.numel()) * uint64_t(r.element_size())});
  }
  check_cpu_contig(out, "output", 0);
  if (out.scalar_type() != at::kByte) value_error("the output buffer must be a uint8 tensor");
  std::vector<uint8_t> cb = codebook_bytes(codebook, n_codes);
  uint64_t len = 0;
  try {
    py::gil_scoped_release nogil;
    len = sz::cpu::encode(src.data(), src.size(), int(dtype_code), cb.empty() ? nullptr : cb.data(), int(cb.size()),
                          int(chunk_log2), out.data_ptr<uint8_t>(), uint64_t(out.numel()), tag, two_level);
  } catch (const sz::cpu::ArgumentError& e) {
    value_error(e.what());
  }
  return int64_t(len);
}

void decode_into(const at::Tensor& payload, int64_t payload_len, const std::vector<at::Tensor>& regions,
                 int64_t dtype_code, uint64_t tag) {
  check_cpu_contig(payload, "payload", 0);
  if (payload.scalar_type() != at::kByte) value_error("the payload must be a uint8 tensor");
  if (payload_len < 0 || payload_len > payload.numel())
    value_error("payload_len " + std::to_string(payload_len) + " exceeds the payload tensor's " +
                std::to_string(payload.numel()) + " bytes");
  std::vector<sz::cpu::DstRegion> dst;
  dst.reserve(regions.size());
  for (size_t i = 0; i < regions.size(); ++i) {
    const at::Tensor& r = regions[i];
    check_cpu_contig(r, "region", i);
    check_elem_size(r, int(dtype_code), "region", i);
    dst.push_back({static_cast<uint8_t*>(r.data_ptr()), uint64_t(r.numel()) * uint64_t(r.element_size())});
  }
  try {
    py::gil_scoped_release nogil;
    sz::cpu::decode(payload.data_ptr<uint8_t>(), uint64_t(payload_len), dst.data(), dst.size(), int(dtype_code), tag);
  } catch (const sz::cpu::ArgumentError& e) {
    value_error(e.what());
  } catch (const sz::cpu::PayloadError& e) {
    throw std::runtime_error(std::string(kPayloadMarker) + std::to_string(e.status) + " " + std::to_string(e.aux));
  }
}

py::dict format_constants() {
  py::dict d;
  d["MAGIC"] = py::bytes(reinterpret_cast<const char*>(sz::kMagic), 4);
  d["VERSION"] = sz::kVersion;
  d["HEADER_BYTES"] = sz::kHeaderBytes;
  d["VERSION_V1"] = sz::kVersionV1;
  d["HEADER_BYTES_V1"] = sz::kHeaderBytesV1;
  d["EXT_BYTES"] = sz::kExtBytes;
  d["OFF_TRANSFER_TAG"] = sz::kOffTransferTag;
  d["OFF_EXT"] = sz::kOffExt;
  d["CAPACITY_SLACK"] = sz::kCapacitySlack;
  d["MODE_RAW"] = sz::kModeRaw;
  d["MODE_EXP4"] = sz::kModeExp4;
  d["CODE_BITS"] = sz::kCodeBits;
  d["MAX_CODES"] = sz::kMaxCodes;
  d["MIN_CHUNK_LOG2"] = sz::kMinChunkLog2;
  d["MAX_CHUNK_LOG2"] = sz::kMaxChunkLog2;
  d["DEFAULT_CHUNK_LOG2"] = sz::kDefaultChunkLog2;
  d["SECTION_ALIGN"] = sz::kSectionAlign;
  d["LUT_ESCAPE"] = sz::kLutEscape;
  d["MODE_EXP2L"] = sz::kModeExp2l;
  d["EXP2L_CODE_BITS"] = sz::kExp2lCodeBits;
  d["EXP2L_MAX_PRIMARY"] = sz::kExp2lMaxPrimary;
  d["EXP2L_MAX_SECONDARY"] = sz::kExp2lMaxSecondary;
  d["EXP2L_MARKER"] = sz::kExp2lMarker;
  d["EXP2L_SEC_ESCAPE"] = sz::kExp2lSecEscape;
  d["MAX_CODEBOOK"] = sz::kMaxCodebook;
  d["EXT_OFF_N_SEC"] = sz::kExtOffNSec;
  d["EXT_OFF_SEC_BYTES"] = sz::kExtOffSecBytes;
  py::dict sizes;
  py::dict exp4;
  for (int c = 0; c < sz::kNumDtypes; ++c) {
    sizes[py::int_(c)] = sz::dtype_elem_size(c);
    exp4[py::int_(c)] = sz::dtype_exp4_allowed(c);
  }
  d["ELEMENT_SIZES"] = sizes;
  d["EXP4_ALLOWED"] = exp4;
  return d;
}

// Header helpers exposed for the consistency tests (pack/CRC/layout computed by format.h).
py::bytes pack_header(int dtype, int mode, int code_bits, int n_codes, int chunk_log2, py::bytes codebook,
                      uint64_t n_elems, uint64_t n_escapes, uint64_t body_bytes, uint32_t ca, uint32_t cb,
                      uint64_t tag, int version) {
  sz::Header h;
  h.version = uint8_t(version);
  h.transfer_tag = tag;
  h.dtype = uint8_t(dtype);
  h.mode = uint8_t(mode);
  h.code_bits = uint8_t(code_bits);
  h.n_codes = uint8_t(n_codes);
  h.chunk_log2 = uint8_t(chunk_log2);
  std::string s = codebook;
  for (size_t i = 0; i < 16 && i < s.size(); ++i) h.codebook[i] = uint8_t(s[i]);
  h.n_elems = n_elems;
  h.n_escapes = n_escapes;
  h.body_bytes = body_bytes;
  h.checksum_a = ca;
  h.checksum_b = cb;
  uint8_t out[sz::kHeaderBytes];
  const int len = sz::pack_header(h, out);
  return py::bytes(reinterpret_cast<const char*>(out), size_t(len));
}

py::tuple exp4_layout(uint64_t n, int chunk_log2, uint64_t m) {
  const sz::Exp4Layout l = sz::Exp4Layout::compute(n, chunk_log2, m);
  return py::make_tuple(l.n_chunks, l.off_codes, l.off_counts, l.off_pos, l.off_exp, l.body_bytes);
}

py::tuple exp2l_layout(uint64_t n, int chunk_log2, uint64_t m, uint64_t sec_bytes) {
  const sz::Exp2lLayout l = sz::Exp2lLayout::compute(n, chunk_log2, m, sec_bytes);
  return py::make_tuple(l.n_chunks, l.off_codes, l.off_scounts, l.off_sec, l.off_counts, l.off_pos, l.off_exp,
                        l.body_bytes);
}

// format.h validate_header (tests: agreement with format.py). `header` holds the payload's first
// min(available, 96) bytes or at least its header (zero-padded to 96 here); use_table: the CRC through the 256-entry table of the CUDA kernels. Returns the SzStatus.
int validate_header_status(py::bytes header, uint64_t available, uint64_t tag, bool use_table) {
  std::string s = header;
  uint8_t buf[sz::kHeaderBytes] = {0};
  std::memcpy(buf, s.data(), std::min<size_t>(s.size(), sizeof buf));
  uint32_t tab[256];
  for (uint32_t i = 0; i < 256; ++i) tab[i] = sz::crc32_table_entry(i);
  return sz::validate_header(buf, available, tag, nullptr, use_table ? tab : nullptr);
}

uint32_t crc32_bytes(py::bytes data) {
  std::string s = data;
  return sz::crc32(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SplitZip-KV CPU codec (FORMAT.md v2; decodes v1 too)";
  m.attr("PAYLOAD_ERROR_MARKER") = kPayloadMarker;
  m.def("encode_into", &encode_into, py::arg("regions"), py::arg("dtype_code"), py::arg("codebook"),
        py::arg("n_codes"), py::arg("chunk_log2"), py::arg("out"), py::arg("tag") = 0, py::arg("two_level") = false,
        "Encode the concatenation of `regions` into `out`, bound to transfer `tag` (u64), EXP2L allowed when "
        "`two_level`; returns the payload length.");
  m.def("decode_into", &decode_into, py::arg("payload"), py::arg("payload_len"), py::arg("regions"),
        py::arg("dtype_code"), py::arg("tag") = 0,
        "Decode the first `payload_len` bytes of `payload` into `regions`; the payload's transfer tag must be "
        "`tag`.");
  m.def("format_constants", &format_constants, "Constants of csrc/include/splitzip/format.h.");
  m.def("pack_header", &pack_header, py::arg("dtype"), py::arg("mode"), py::arg("code_bits"), py::arg("n_codes"),
        py::arg("chunk_log2"), py::arg("codebook"), py::arg("n_elems"), py::arg("n_escapes"), py::arg("body_bytes"),
        py::arg("checksum_a"), py::arg("checksum_b"), py::arg("tag") = 0, py::arg("version") = sz::kVersion,
        "format.h pack_header (tests): 96 bytes, or 64 for version 1.");
  m.def("exp4_layout", &exp4_layout, "format.h Exp4Layout::compute -> (n_chunks, off_codes, off_counts, off_pos, off_exp, body_bytes).");
  m.def("exp2l_layout", &exp2l_layout, "format.h Exp2lLayout::compute -> (n_chunks, off_codes, off_scounts, "
        "off_sec, off_counts, off_pos, off_exp, body_bytes).");
  m.def("crc32", &crc32_bytes, "format.h crc32 (tests).");
  m.def("validate_header", &validate_header_status, py::arg("header"), py::arg("available"), py::arg("tag") = 0,
        py::arg("use_table") = false, "format.h validate_header (tests): the SzStatus of a header.");
  m.attr("NUM_STATUS") = int(SZ_NUM_STATUS);
  m.def("simd_level", &sz::cpu::simd_level, "0 = scalar, 1 = AVX-512 kernels in use.");
  m.def("max_simd_level", &sz::cpu::max_simd_level);
  m.def("set_simd_level", &sz::cpu::set_simd_level, py::arg("level"),
        "Choose the kernel level (clamped to the CPU's); returns the level in effect.");
}
