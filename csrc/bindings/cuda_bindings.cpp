// Thin torch extension `splitzip_vllm._C_cuda` over csrc/cuda/splitzip_cuda.{h,cu}.
//
// Everything runs on the CURRENT torch CUDA stream of the tensors' device, and nothing here synchronizes with
// the host: the region table (when more than one region is given) goes to the device through a pinned buffer
// and a non-blocking copy -- refused while the stream is being captured into a CUDA graph (the graph would
// replay a copy from a host buffer that is gone by then; pass device tables: encode_ptrs / decode_ptrs) --, and
// decode returns a device status tensor (int32[4]: code, aux lo, aux hi, 0) that the Python layer turns into
// PayloadError (format.py's status table). Workspaces are cached per (device, stream) outside graph capture
// (inside, they come from the graph's pool, which keeps them for the graph's lifetime). Every caller tensor the
// kernels touch is recorded on the current stream (recordStream), so a caller on a side stream may free its
// tensors right after the call. Argument problems raise ValueError; CUDA launch errors raise RuntimeError.
#include <torch/extension.h>

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <utility>
#include <string>
#include <vector>

#include "../cuda/splitzip_cuda.h"
#include "splitzip/format.h"

namespace py = pybind11;
namespace sz = splitzip;

namespace {

[[noreturn]] void value_error(const std::string& m) { throw py::value_error(m); }

void check_launch(int rc, const char* what) {
  if (rc == SZ_LAUNCH_OK) return;
  switch (rc) {
    case SZ_LAUNCH_BAD_ARG: value_error(std::string(what) + ": inconsistent arguments");
    case SZ_LAUNCH_MISALIGNED: value_error(std::string(what) + ": buffer must be 16-byte aligned");
    case SZ_LAUNCH_SMALL_BUFFER: value_error(std::string(what) + ": output buffer smaller than encode_capacity");
    case SZ_LAUNCH_SMALL_WORKSPACE: value_error(std::string(what) + ": workspace too small");
    default:
      throw std::runtime_error(std::string(what) + ": CUDA error " +
                               cudaGetErrorString(static_cast<cudaError_t>(rc)));
  }
}

int elem_size_of(int64_t dtype_code) {
  const int es = sz::dtype_elem_size(int(dtype_code));
  if (es == 0) value_error("unknown dtype code " + std::to_string(dtype_code));
  return es;
}

void check_cuda_tensor(const at::Tensor& t, const at::Device& dev, const char* what, size_t i) {
  if (!t.is_cuda()) value_error(std::string(what) + " " + std::to_string(i) + " is not a CUDA tensor");
  if (t.device() != dev)
    value_error(std::string(what) + " " + std::to_string(i) + " is on " + t.device().str() + ", expected " +
                dev.str());
  if (!t.is_contiguous()) value_error(std::string(what) + " " + std::to_string(i) + " is not contiguous");
}

c10::cuda::CUDAStream current_stream(const at::Device& dev) { return c10::cuda::getCurrentCUDAStream(dev.index()); }

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream, &st) == cudaSuccess && st != cudaStreamCaptureStatusNone;
}

// The kernels on `stream` use t: the caching allocator must not hand its memory out again before they are done,
// even when t was allocated on (and is freed from) another stream.
void record_on(const at::Tensor& t, const c10::cuda::CUDAStream& stream) {
  if (t.defined() && t.numel() > 0 && t.has_storage())
    c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream);
}

// Device workspace of at least `bytes`: cached per (device, stream) outside graph capture (stream order keeps
// calls on one stream from overlapping; a grown cache entry frees the old one stream-ordered); inside a capture a
// fresh allocation from the graph's private pool.
std::mutex g_ws_mu;
std::map<std::pair<int, cudaStream_t>, at::Tensor> g_ws;

at::Tensor workspace(size_t bytes, const at::Device& dev, const c10::cuda::CUDAStream& stream) {
  const auto opts = at::TensorOptions().dtype(at::kByte).device(dev);
  const int64_t want = int64_t(bytes < 256 ? 256 : bytes);
  if (capturing(stream.stream())) return at::empty({want}, opts);
  std::lock_guard<std::mutex> lock(g_ws_mu);
  at::Tensor& t = g_ws[{int(dev.index()), stream.stream()}];
  if (!t.defined() || t.numel() < want) t = at::empty({want + want / 4}, opts);
  return t;
}

void release_workspaces() {
  std::lock_guard<std::mutex> lock(g_ws_mu);
  g_ws.clear();
}

// Region table of a list of tensors (empty regions dropped). `keep` holds the device copy of the table.
struct Table {
  SzRegions r{};
  at::Tensor keep;
};

Table table_from_list(const std::vector<at::Tensor>& regions, int esize, const at::Device& dev) {
  std::vector<const at::Tensor*> parts;
  for (size_t i = 0; i < regions.size(); ++i) {
    const at::Tensor& t = regions[i];
    check_cuda_tensor(t, dev, "region", i);
    if (int(t.element_size()) != esize)
      value_error("region " + std::to_string(i) + " has element size " + std::to_string(t.element_size()) +
                  ", the dtype code needs " + std::to_string(esize));
    if (t.numel() > 0) parts.push_back(&t);
  }
  Table tb;
  int64_t n = 0;
  for (const at::Tensor* t : parts) n += t->numel();
  tb.r.n = n;
  tb.r.count = int64_t(parts.size());
  if (parts.size() == 1) tb.r.ptr0 = reinterpret_cast<uint64_t>(parts[0]->data_ptr());
  if (parts.size() <= 1) return tb;
  if (capturing(current_stream(dev).stream()))
    value_error("splitzip cuda: a list of " + std::to_string(parts.size()) +
                " regions needs a region table copied from pinned host memory, which CUDA-graph capture cannot "
                "replay safely; inside a graph pass a device table (CudaBackend.encode_table_into / "
                "decode_table_into_async) or one contiguous region");
  bool uniform = true;
  for (const at::Tensor* t : parts) uniform &= t->numel() == parts[0]->numel();
  const int64_t k = int64_t(parts.size());
  const int64_t len = uniform ? k : 2 * k + 1;
  at::Tensor host = at::empty({len}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  int64_t off = 0;
  for (int64_t i = 0; i < k; ++i) {
    h[i] = int64_t(reinterpret_cast<uintptr_t>(parts[size_t(i)]->data_ptr()));
    if (!uniform) h[k + i] = off;
    off += parts[size_t(i)]->numel();
  }
  if (!uniform) h[2 * k] = off;
  tb.keep = at::empty({len}, at::TensorOptions().dtype(at::kLong).device(dev));
  tb.keep.copy_(host, /*non_blocking=*/true);  // pinned -> device on the current stream, no host sync
  const int64_t* d = tb.keep.data_ptr<int64_t>();
  tb.r.ptrs = reinterpret_cast<const uint64_t*>(d);
  if (uniform) {
    tb.r.uniform = parts[0]->numel();
  } else {
    tb.r.prefix = d + k;
  }
  return tb;
}

// Region table given as device tensors by the caller (e.g. cached block-pointer tables of a paged KV cache).
// ptrs: int64 CUDA tensor of base addresses; prefix: None (every region holds region_elems elements) or an
// int64 CUDA tensor of count+1 element offsets (0, ..., n_elems). The table contents are trusted.
SzRegions table_from_ptrs(const at::Tensor& ptrs, const std::optional<at::Tensor>& prefix, int64_t region_elems,
                          int64_t n_elems, const at::Device& dev) {
  check_cuda_tensor(ptrs, dev, "pointer table", 0);
  if (ptrs.scalar_type() != at::kLong) value_error("the pointer table must be an int64 tensor");
  if (n_elems < 0) value_error("n_elems must be >= 0");
  SzRegions r{};
  r.n = n_elems;
  r.count = ptrs.numel();
  if (n_elems > 0 && r.count < 1) value_error("the pointer table is empty");
  r.ptrs = reinterpret_cast<const uint64_t*>(ptrs.data_ptr<int64_t>());
  if (prefix.has_value()) {
    check_cuda_tensor(*prefix, dev, "prefix table", 0);
    if (prefix->scalar_type() != at::kLong || prefix->numel() != r.count + 1)
      value_error("the prefix table must be int64 with one more entry than the pointer table");
    r.prefix = prefix->data_ptr<int64_t>();
  } else {
    if (region_elems <= 0 || region_elems * r.count != n_elems)
      value_error("n_elems must equal region_elems * len(ptrs) when no prefix table is given");
    r.uniform = region_elems;
  }
  return r;
}

// The codebook's exponents, most frequent first: up to 22 (EXP4 takes the first 16, EXP2L all, FORMAT.md §5).
std::vector<uint8_t> codebook_bytes(const std::optional<std::vector<int64_t>>& codebook) {
  std::vector<uint8_t> cb;
  if (!codebook.has_value()) return cb;
  if (codebook->size() > size_t(sz::kMaxCodebook))
    value_error("a codebook holds at most " + std::to_string(sz::kMaxCodebook) + " exponents");
  for (int64_t e : *codebook) {
    if (e < 0 || e > 255) value_error("codebook exponents must be 0..255");
    cb.push_back(uint8_t(e));
  }
  return cb;
}

void check_out(const at::Tensor& out, const at::Device& dev) {
  check_cuda_tensor(out, dev, "output", 0);
  if (out.scalar_type() != at::kByte) value_error("the output buffer must be a uint8 tensor");
}

void encode_impl(const SzRegions& r, const at::Device& dev, int64_t dtype_code,
                 const std::optional<std::vector<int64_t>>& codebook, int64_t chunk_log2, at::Tensor& out,
                 uint64_t tag, bool two_level) {
  const int esize = elem_size_of(dtype_code);
  check_out(out, dev);
  const std::vector<uint8_t> cb = codebook_bytes(codebook);
  const uint64_t cap = sz::encode_capacity(uint64_t(r.n), uint64_t(esize));
  if (uint64_t(out.numel()) < cap)
    value_error("output buffer holds " + std::to_string(out.numel()) + " bytes, encode needs " +
                std::to_string(cap));
  const size_t ws_bytes = splitzip_cuda_encode_workspace_bytes(r.n, int(dtype_code), cb.empty() ? 0 : 1,
                                                              two_level ? 1 : 0, int(chunk_log2));
  const c10::cuda::CUDAStream cs = current_stream(dev);
  const cudaStream_t stream = cs.stream();
  at::Tensor ws = workspace(ws_bytes, dev, cs);
  record_on(out, cs);
  check_launch(splitzip_cuda_encode(&r, int(dtype_code), cb.empty() ? nullptr : cb.data(), int(cb.size()),
                                    two_level ? 1 : 0, int(chunk_log2), tag, out.data_ptr<uint8_t>(),
                                    uint64_t(out.numel()),
                                    ws.data_ptr(), ws_bytes, stream),
               "splitzip cuda encode");
}

at::Tensor decode_impl(const SzRegions& r, const at::Device& dev, const at::Tensor& payload, int64_t payload_len,
                       int64_t dtype_code, std::optional<at::Tensor> status, uint64_t tag) {
  elem_size_of(dtype_code);
  check_cuda_tensor(payload, dev, "payload", 0);
  if (payload.scalar_type() != at::kByte) value_error("the payload must be a uint8 tensor");
  if (payload_len < 0 || payload_len > payload.numel())
    value_error("payload_len " + std::to_string(payload_len) + " exceeds the payload tensor's " +
                std::to_string(payload.numel()) + " bytes");
  at::Tensor st;
  if (status.has_value()) {
    st = *status;
    check_cuda_tensor(st, dev, "status", 0);
    if (st.scalar_type() != at::kInt || st.numel() < 4) value_error("status must be an int32 tensor of 4 entries");
  } else {
    st = at::empty({4}, payload.options().dtype(at::kInt));
  }
  const size_t ws_bytes = splitzip_cuda_decode_workspace_bytes(r.n, int(dtype_code));
  const c10::cuda::CUDAStream cs = current_stream(dev);
  const cudaStream_t stream = cs.stream();
  at::Tensor ws = workspace(ws_bytes, dev, cs);
  record_on(payload, cs);
  record_on(st, cs);
  // an empty payload tensor has no storage; point at the (16-byte aligned) workspace, which is never read
  // as payload because payload_len == 0 fails validation first
  const uint8_t* pp = payload.numel() > 0 ? payload.data_ptr<uint8_t>() : static_cast<const uint8_t*>(ws.data_ptr());
  check_launch(splitzip_cuda_decode(pp, uint64_t(payload_len), &r, int(dtype_code), tag,
                                    reinterpret_cast<uint32_t*>(st.data_ptr<int32_t>()), ws.data_ptr(), ws_bytes,
                                    stream),
               "splitzip cuda decode");
  return st;
}

void encode_regions(const std::vector<at::Tensor>& regions, int64_t dtype_code,
                    const std::optional<std::vector<int64_t>>& codebook, int64_t chunk_log2, at::Tensor out,
                    uint64_t tag, bool two_level) {
  const at::Device dev = out.device();
  c10::cuda::CUDAGuard guard(dev);
  const Table tb = table_from_list(regions, elem_size_of(dtype_code), dev);
  for (const at::Tensor& t : regions) record_on(t, current_stream(dev));
  encode_impl(tb.r, dev, dtype_code, codebook, chunk_log2, out, tag, two_level);
}

void encode_ptrs(const at::Tensor& ptrs, const std::optional<at::Tensor>& prefix, int64_t region_elems,
                 int64_t n_elems, int64_t dtype_code, const std::optional<std::vector<int64_t>>& codebook,
                 int64_t chunk_log2, at::Tensor out, uint64_t tag, bool two_level) {
  const at::Device dev = out.device();
  c10::cuda::CUDAGuard guard(dev);
  const SzRegions r = table_from_ptrs(ptrs, prefix, region_elems, n_elems, dev);
  record_on(ptrs, current_stream(dev));
  if (prefix.has_value()) record_on(*prefix, current_stream(dev));
  encode_impl(r, dev, dtype_code, codebook, chunk_log2, out, tag, two_level);
}

at::Tensor decode_regions(const at::Tensor& payload, int64_t payload_len, const std::vector<at::Tensor>& regions,
                          int64_t dtype_code, std::optional<at::Tensor> status, uint64_t tag) {
  const at::Device dev = payload.device();
  c10::cuda::CUDAGuard guard(dev);
  const Table tb = table_from_list(regions, elem_size_of(dtype_code), dev);
  for (const at::Tensor& t : regions) record_on(t, current_stream(dev));
  return decode_impl(tb.r, dev, payload, payload_len, dtype_code, status, tag);
}

at::Tensor decode_ptrs(const at::Tensor& payload, int64_t payload_len, const at::Tensor& ptrs,
                       const std::optional<at::Tensor>& prefix, int64_t region_elems, int64_t n_elems,
                       int64_t dtype_code, std::optional<at::Tensor> status, uint64_t tag) {
  const at::Device dev = payload.device();
  c10::cuda::CUDAGuard guard(dev);
  const SzRegions r = table_from_ptrs(ptrs, prefix, region_elems, n_elems, dev);
  record_on(ptrs, current_stream(dev));
  if (prefix.has_value()) record_on(*prefix, current_stream(dev));
  return decode_impl(r, dev, payload, payload_len, dtype_code, status, tag);
}

// All payloads of one request in one launch: items[i] (a list of CUDA tensors) -> outs[i] (uint8, 16-byte
// aligned, >= encode_capacity) bound to tags[i]. Returns the device int64 tensor of the payload lengths. The item
// descriptors (and multi-region tables) go to the device from pinned memory: refused inside graph capture.
at::Tensor encode_batch(const std::vector<std::vector<at::Tensor>>& items, int64_t dtype_code,
                        const std::optional<std::vector<int64_t>>& codebook, int64_t chunk_log2,
                        const std::vector<at::Tensor>& outs, const std::vector<uint64_t>& tags) {
  if (items.empty() || items.size() != outs.size() || items.size() != tags.size())
    value_error("encode_batch needs one output buffer and one tag per item, and at least one item");
  const at::Device dev = outs[0].device();
  c10::cuda::CUDAGuard guard(dev);
  const c10::cuda::CUDAStream cs = current_stream(dev);
  if (capturing(cs.stream()))
    value_error("splitzip cuda encode_batch copies its item table from pinned host memory: not inside CUDA-graph "
                "capture (encode the items one by one with device region tables there)");
  const int esize = elem_size_of(dtype_code);
  const std::vector<uint8_t> cb = codebook_bytes(codebook);
  const int64_t count = int64_t(items.size());
  at::Tensor host = at::empty({count * int64_t(sizeof(SzBatchItem))},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* h = reinterpret_cast<SzBatchItem*>(host.data_ptr<uint8_t>());
  std::vector<Table> tables;
  tables.reserve(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    check_out(outs[i], dev);
    tables.push_back(table_from_list(items[i], esize, dev));
    for (const at::Tensor& t : items[i]) record_on(t, cs);
    record_on(outs[i], cs);
    h[i] = SzBatchItem{};
    h[i].src = tables.back().r;
    h[i].out = outs[i].data_ptr<uint8_t>();
    h[i].out_capacity = uint64_t(outs[i].numel());
    h[i].tag = tags[i];
  }
  const size_t ws_bytes = splitzip_cuda_encode_batch_plan(h, int(count), int(dtype_code), int(cb.size()),
                                                          int(chunk_log2));
  if (ws_bytes == 0) value_error("encode_batch: inconsistent arguments");
  at::Tensor dev_items = at::empty({host.numel()}, at::TensorOptions().dtype(at::kByte).device(dev));
  dev_items.copy_(host, /*non_blocking=*/true);
  at::Tensor lens = at::empty({count}, at::TensorOptions().dtype(at::kLong).device(dev));
  at::Tensor ws = workspace(ws_bytes, dev, cs);
  check_launch(splitzip_cuda_encode_batch(h, reinterpret_cast<const SzBatchItem*>(dev_items.data_ptr<uint8_t>()),
                                          int(count), int(dtype_code), cb.empty() ? nullptr : cb.data(),
                                          int(cb.size()), int(chunk_log2),
                                          reinterpret_cast<uint64_t*>(lens.data_ptr<int64_t>()), ws.data_ptr(),
                                          ws_bytes, cs.stream()),
               "splitzip cuda encode_batch");
  return lens;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SplitZip-KV CUDA codec (FORMAT.md v2; decodes v1 too); no host synchronization";
  m.def("encode", &encode_regions, py::arg("regions"), py::arg("dtype_code"), py::arg("codebook"),
        py::arg("chunk_log2"), py::arg("out"), py::arg("tag") = 0, py::arg("two_level") = false,
        "Encode the concatenation of CUDA `regions` into `out` (uint8, >= encode_capacity bytes, 16-byte "
        "aligned) on the current stream, bound to transfer `tag` (u64). `codebook`: list of up to 22 exponents "
        "(most frequent first) or None (RAW); `two_level` allows EXP2L (FORMAT.md §5, chosen on the device). The "
        "length is in the device-side header.");
  m.def("encode_ptrs", &encode_ptrs, py::arg("ptrs"), py::arg("prefix"), py::arg("region_elems"),
        py::arg("n_elems"), py::arg("dtype_code"), py::arg("codebook"), py::arg("chunk_log2"), py::arg("out"),
        py::arg("tag") = 0, py::arg("two_level") = false,
        "encode() over a device table of region base addresses (int64 CUDA tensor) with uniform region_elems "
        "or a device prefix table of element offsets.");
  m.def("decode", &decode_regions, py::arg("payload"), py::arg("payload_len"), py::arg("regions"),
        py::arg("dtype_code"), py::arg("status") = py::none(), py::arg("tag") = 0,
        "Decode the first `payload_len` bytes of `payload` (16-byte aligned) into CUDA `regions` on the current "
        "stream; the payload's transfer tag must be `tag`. Returns the device status tensor int32[4] (0 = ok) "
        "without synchronizing.");
  m.def("decode_ptrs", &decode_ptrs, py::arg("payload"), py::arg("payload_len"), py::arg("ptrs"),
        py::arg("prefix"), py::arg("region_elems"), py::arg("n_elems"), py::arg("dtype_code"),
        py::arg("status") = py::none(), py::arg("tag") = 0,
        "decode() into a device region table (see encode_ptrs).");
  m.def("encode_batch", &encode_batch, py::arg("items"), py::arg("dtype_code"), py::arg("codebook"),
        py::arg("chunk_log2"), py::arg("outs"), py::arg("tags"),
        "Encode every item (a list of CUDA tensors) into its output buffer in ONE kernel launch on the current "
        "stream, EXP4 / RAW only (the first 16 exponents); returns the device int64 tensor of payload lengths (no "
        "host synchronization).");
  m.def("release_workspaces", &release_workspaces, "Free the cached per-stream workspaces.");
  m.def("encode_workspace_bytes", &splitzip_cuda_encode_workspace_bytes, py::arg("n_elems"), py::arg("dtype_code"),
        py::arg("codebook_given"), py::arg("two_level"), py::arg("chunk_log2"));
  m.def("decode_workspace_bytes", &splitzip_cuda_decode_workspace_bytes, py::arg("n_elems"), py::arg("dtype_code"));
}
