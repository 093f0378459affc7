// The host-store row gather of the device lookups (serve/device_cache.py), as an XLA FFI
// handler: one source, two builds (serve/ffi_gather.py compiles it at first use).
//   * CPU build: the handler gathers straight into XLA's output buffer.
//   * CUDA build (-DSCONE_CUDA, CUDA runtime API only, no nvcc): on the handler's stream,
//     the ids and the context vector are copied device -> pinned host staging, the host
//     gathers from the store into pinned staging, and one copy host -> device fills the
//     output. No Python and no GIL on the path; two stream syncs per call.
// Both call the same `Gather` on raw bytes, so every store dtype (float32, bf16, int8 or
// fp8 quantised rows) crosses as its bits, unchanged.
//
// Operands: ids_B int32 (row of the store, -1 for none) and the context vector (uint32
// words of int64 values, built by serve/ffi_gather.GatherContext): B, W (elements per row),
// the number of store shards, rows per shard, the address of an int64 pair of counters
// (rows read, calls), then (address, rows) per shard. Result: rows_BxW in the store's raw
// dtype (uint8/16/32), zeros where ids_B < 0.

#include <cstdint>
#include <cstring>
#include <string>

#include "xla/ffi/api/ffi.h"
#ifdef SCONE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace ffi = xla::ffi;

namespace {

enum : int64_t { kB, kWidth, kShards, kChunk, kCounters, kHead };

// Row ids[b] of the store (shard id / chunk, row id % chunk) into out row b, zeros for
// ids[b] < 0, row_bytes per row. Counts the rows read and the call. The ids come from the
// device matcher, which yields only rows of the table the store was checked against.
void Gather(const int32_t* ids, const int64_t* ctx, int64_t row_bytes, uint8_t* out) {
  const int64_t b = ctx[kB], chunk = ctx[kChunk];
  const int64_t* shards = ctx + kHead;
  int64_t read = 0;
  for (int64_t i = 0; i < b; ++i) {
    uint8_t* dst = out + i * row_bytes;
    const int64_t r = ids[i];
    if (r < 0) {
      std::memset(dst, 0, row_bytes);
      continue;
    }
    const uint8_t* shard = reinterpret_cast<const uint8_t*>(shards[2 * (r / chunk)]);
    std::memcpy(dst, shard + (r % chunk) * row_bytes, row_bytes);
    ++read;
  }
  int64_t* counters = reinterpret_cast<int64_t*>(ctx[kCounters]);
  counters[0] += read;
  counters[1] += 1;
}

// The result must be [B, W] of the context's B and W (the operand shapes are checked by
// the Python side when the call is built; this guards a stale context).
ffi::Error CheckShapes(int64_t ids, int64_t ctx_words, const int64_t* ctx,
                       size_t out_bytes, int64_t* row_bytes) {
  if (ctx_words < 2 * kHead || ids != ctx[kB] || ctx[kB] <= 0 ||
      ctx[kWidth] <= 0 || ctx_words < 2 * (kHead + 2 * ctx[kShards])) {
    return ffi::Error::InvalidArgument("scone_jax f-gram gather: context does not fit ids");
  }
  if (out_bytes % (ctx[kB] * ctx[kWidth]) != 0) {
    return ffi::Error::InvalidArgument("scone_jax f-gram gather: result is not [B, W]");
  }
  *row_bytes = static_cast<int64_t>(out_bytes) / ctx[kB];
  return ffi::Error::Success();
}

ffi::Error GatherHost(ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::U32> ctx,
                      ffi::Result<ffi::AnyBuffer> out) {
  const int64_t* c = reinterpret_cast<const int64_t*>(ctx.typed_data());
  int64_t row_bytes = 0;
  ffi::Error e = CheckShapes(ids.element_count(), ctx.element_count(), c, out->size_bytes(),
                             &row_bytes);
  if (!e.success()) return e;
  Gather(ids.typed_data(), c, row_bytes, static_cast<uint8_t*>(out->untyped_data()));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SconeGatherHost, GatherHost,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::AnyBuffer>());

#ifdef SCONE_CUDA
namespace {

// Page-locked staging, one per host thread that runs the handler, grown as needed and
// reused: every call syncs its stream before returning, so no copy is left reading it.
struct Staging {
  void* data = nullptr;
  size_t bytes = 0;
  ~Staging() {
    if (data != nullptr) cudaFreeHost(data);
  }
};

ffi::Error CudaError(cudaError_t e, const char* what) {
  return ffi::Error::Internal(std::string("scone_jax f-gram gather: ") + what + ": " +
                              cudaGetErrorString(e));
}

ffi::Error GatherCuda(cudaStream_t stream, ffi::Buffer<ffi::S32> ids,
                      ffi::Buffer<ffi::U32> ctx, ffi::Result<ffi::AnyBuffer> out) {
  thread_local Staging staging;
  const size_t ids_bytes = ids.size_bytes(), ctx_bytes = ctx.size_bytes();
  const size_t ctx_at = (ids_bytes + 7) / 8 * 8, out_at = ctx_at + (ctx_bytes + 7) / 8 * 8;
  const size_t need = out_at + out->size_bytes();
  cudaError_t err;
  if (staging.bytes < need) {
    if (staging.data != nullptr) cudaFreeHost(staging.data);
    staging.data = nullptr;
    staging.bytes = 0;
    if ((err = cudaMallocHost(&staging.data, need)) != cudaSuccess) {
      return CudaError(err, "cudaMallocHost");
    }
    staging.bytes = need;
  }
  uint8_t* base = static_cast<uint8_t*>(staging.data);
  if ((err = cudaMemcpyAsync(base, ids.untyped_data(), ids_bytes, cudaMemcpyDeviceToHost,
                             stream)) != cudaSuccess ||
      (err = cudaMemcpyAsync(base + ctx_at, ctx.untyped_data(), ctx_bytes,
                             cudaMemcpyDeviceToHost, stream)) != cudaSuccess ||
      (err = cudaStreamSynchronize(stream)) != cudaSuccess) {
    return CudaError(err, "reading the ids");
  }
  const int64_t* c = reinterpret_cast<const int64_t*>(base + ctx_at);
  int64_t row_bytes = 0;
  ffi::Error e = CheckShapes(ids.element_count(), ctx.element_count(), c, out->size_bytes(),
                             &row_bytes);
  if (!e.success()) return e;
  Gather(reinterpret_cast<const int32_t*>(base), c, row_bytes, base + out_at);
  if ((err = cudaMemcpyAsync(out->untyped_data(), base + out_at, out->size_bytes(),
                             cudaMemcpyHostToDevice, stream)) != cudaSuccess ||
      (err = cudaStreamSynchronize(stream)) != cudaSuccess) {
    return CudaError(err, "writing the rows");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SconeGatherCuda, GatherCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::AnyBuffer>());
#endif  // SCONE_CUDA
