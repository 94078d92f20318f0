// An XLA FFI handler that runs a Python function on the host from jitted code, in place of
// jax.experimental.io_callback: on an H200, a decode step's 32 host calls cost about 0.56 ms each
// through io_callback and 0.06 ms through this handler (host_offload.host_call; 640 calls of
// a jitted fori_loop).
//
// The function is named by an integer attribute `fn`; a ctypes callback (the dispatcher, set
// once from Python) receives it with the host addresses of the operands and results. On the
// CPU those are XLA's own buffers. On a CUDA GPU the operands are copied into pinned host
// memory on XLA's stream, the stream is synchronized, the function runs, and the results go
// back the same way. The CUDA driver is looked up at run time (dlopen), so building needs no
// CUDA headers; the staging memory is the calling thread's, grown as needed.
//
// Built on first use by host_offload.native (c++ -O2 -I<jax ffi headers>).

#include <dlfcn.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Returns 0, or writes a message (at most `cap` bytes, NUL-terminated) and returns nonzero.
typedef int (*Dispatch)(int64_t fn, void* const* args, void* const* rets, char* msg,
                        int64_t cap);
Dispatch dispatch = nullptr;

ffi::Error Run(int64_t fn, void* const* args, void* const* rets) {
  if (dispatch == nullptr)
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "host call: no dispatcher set");
  std::string msg(1024, '\0');
  if (dispatch(fn, args, rets, msg.data(), static_cast<int64_t>(msg.size())) != 0)
    return ffi::Error(ffi::ErrorCode::kInternal, "host call failed: " + std::string(msg.c_str()));
  return ffi::Error::Success();
}

ffi::Error Buffers(ffi::RemainingArgs args, ffi::RemainingRets rets, std::vector<void*>& a,
                   std::vector<void*>& r, std::vector<size_t>& a_bytes,
                   std::vector<size_t>& r_bytes) {
  for (size_t i = 0; i < args.size(); ++i) {
    auto buffer = args.get<ffi::AnyBuffer>(i);
    if (buffer.has_error()) return buffer.error();
    a.push_back(buffer.value().untyped_data());
    a_bytes.push_back(buffer.value().size_bytes());
  }
  for (size_t i = 0; i < rets.size(); ++i) {
    auto buffer = rets.get<ffi::AnyBuffer>(i);
    if (buffer.has_error()) return buffer.error();
    r.push_back(buffer.value()->untyped_data());
    r_bytes.push_back(buffer.value()->size_bytes());
  }
  return ffi::Error::Success();
}

ffi::Error Cpu(int64_t fn, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  std::vector<void*> a, r;
  std::vector<size_t> a_bytes, r_bytes;
  if (auto err = Buffers(args, rets, a, r, a_bytes, r_bytes); err.failure()) return err;
  return Run(fn, a.data(), r.data());
}

// The few driver entry points the copies need (CUDA driver API, stable across versions).
typedef int CUresult;
typedef struct CUctx_st* CUcontext;
typedef struct CUstream_st* CUstream;
typedef unsigned long long CUdeviceptr;

struct Driver {
  CUresult (*stream_ctx)(CUstream, CUcontext*) = nullptr;
  CUresult (*push)(CUcontext) = nullptr;
  CUresult (*pop)(CUcontext*) = nullptr;
  CUresult (*to_host)(void*, CUdeviceptr, size_t, CUstream) = nullptr;
  CUresult (*to_device)(CUdeviceptr, const void*, size_t, CUstream) = nullptr;
  CUresult (*sync)(CUstream) = nullptr;
  CUresult (*host_alloc)(void**, size_t, unsigned int) = nullptr;
  CUresult (*host_free)(void*) = nullptr;
  bool ok = false;
};

const Driver& driver() {
  static Driver d;
  static std::once_flag once;
  std::call_once(once, [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);  // XLA's own, already loaded
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (lib == nullptr) return;
    auto get = [&](auto& f, const char* name) {
      f = reinterpret_cast<std::remove_reference_t<decltype(f)>>(dlsym(lib, name));
      return f != nullptr;
    };
    d.ok = get(d.stream_ctx, "cuStreamGetCtx") && get(d.push, "cuCtxPushCurrent_v2") &&
           get(d.pop, "cuCtxPopCurrent_v2") && get(d.to_host, "cuMemcpyDtoHAsync_v2") &&
           get(d.to_device, "cuMemcpyHtoDAsync_v2") && get(d.sync, "cuStreamSynchronize") &&
           get(d.host_alloc, "cuMemHostAlloc") && get(d.host_free, "cuMemFreeHost");
  });
  return d;
}

// Pinned host memory of the calling thread, grown to the largest call it has served. Never
// freed at thread exit: that may come after the driver has shut down.
struct Staging {
  char* data = nullptr;
  size_t size = 0;
};

constexpr size_t kAlign = 64;
size_t Aligned(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

ffi::Error CudaError(const char* what, CUresult code) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("host call: ") + what + " failed (CUDA error " +
                        std::to_string(code) + ")");
}

ffi::Error Cuda(CUstream stream, int64_t fn, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  const Driver& cu = driver();
  if (!cu.ok)
    return ffi::Error(ffi::ErrorCode::kUnavailable, "host call: libcuda.so.1 not found");
  std::vector<void*> a, r;
  std::vector<size_t> a_bytes, r_bytes;
  if (auto err = Buffers(args, rets, a, r, a_bytes, r_bytes); err.failure()) return err;
  size_t total = 0;
  for (size_t n : a_bytes) total += Aligned(n);
  for (size_t n : r_bytes) total += Aligned(n);
  CUcontext ctx = nullptr;
  if (CUresult e = cu.stream_ctx(stream, &ctx)) return CudaError("cuStreamGetCtx", e);
  if (CUresult e = cu.push(ctx)) return CudaError("cuCtxPushCurrent", e);
  struct Pop {
    const Driver& cu;
    ~Pop() {
      CUcontext ignored;
      cu.pop(&ignored);
    }
  } pop{cu};
  thread_local Staging stage;
  if (total > stage.size) {
    if (stage.data != nullptr) cu.host_free(stage.data);
    stage.data = nullptr;
    stage.size = 0;
    void* p = nullptr;
    if (CUresult e = cu.host_alloc(&p, total, /*CU_MEMHOSTALLOC_PORTABLE*/ 1))
      return CudaError("cuMemHostAlloc", e);
    stage.data = static_cast<char*>(p);
    stage.size = total;
  }
  std::vector<void*> host_a(a.size()), host_r(r.size());
  size_t at = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    host_a[i] = stage.data + at;
    at += Aligned(a_bytes[i]);
    if (a_bytes[i] == 0) continue;
    if (CUresult e = cu.to_host(host_a[i], reinterpret_cast<CUdeviceptr>(a[i]), a_bytes[i],
                                stream))
      return CudaError("cuMemcpyDtoHAsync", e);
  }
  for (size_t i = 0; i < r.size(); ++i) {
    host_r[i] = stage.data + at;
    at += Aligned(r_bytes[i]);
  }
  if (CUresult e = cu.sync(stream)) return CudaError("cuStreamSynchronize", e);
  if (auto err = Run(fn, host_a.data(), host_r.data()); err.failure()) return err;
  for (size_t i = 0; i < r.size(); ++i) {
    if (r_bytes[i] == 0) continue;
    if (CUresult e = cu.to_device(reinterpret_cast<CUdeviceptr>(r[i]), host_r[i], r_bytes[i],
                                  stream))
      return CudaError("cuMemcpyHtoDAsync", e);
  }
  // The staging memory is reused by this thread's next call: the copies must be done.
  if (CUresult e = cu.sync(stream)) return CudaError("cuStreamSynchronize", e);
  return ffi::Error::Success();
}

}  // namespace

extern "C" void host_call_set_dispatch(Dispatch d) { dispatch = d; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(HostCallCpu, Cpu,
                              ffi::Ffi::Bind()
                                  .Attr<int64_t>("fn")
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(HostCallCuda, Cuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<CUstream>>()
                                  .Attr<int64_t>("fn")
                                  .RemainingArgs()
                                  .RemainingRets());
