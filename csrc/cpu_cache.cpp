// A cache of large CPU output buffers: the CPU analogue, for this library's own [N, T] outputs
// (the backward scatter's gradient, the loss's gradient), of what torch's CUDA caching allocator
// does on a GPU. A fresh [N, T] tensor from torch's CPU allocator is fresh memory whenever glibc
// maps it anew (every allocation of 32 MiB or more, smaller ones after glibc has trimmed its
// heap): the op's first write then takes one page fault per 4 KiB page, which at 8M fp32 tokens
// costs more than the op's own work (docs/performance-cpu.md). Here a buffer the caller has
// dropped is kept, its pages still mapped, and handed to the next output of about its size.
//
// Buffers are anonymous mappings (page aligned), handed to torch as DLPack capsules whose
// deleter returns them here; torch may free a tensor on any thread, so every access holds the
// lock. Kept (free) bytes are bounded by a limit (least recently freed evicted first); limit 0
// maps and unmaps every buffer. The pool object is never destroyed: a tensor may be freed
// during interpreter shutdown, after static destructors ran.
#include <pybind11/pybind11.h>
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <list>
#include <mutex>
#include <new>
#include <vector>

#include "common.h"

namespace py = pybind11;

namespace {

constexpr size_t kPage = 4096;

struct Block {
  void* ptr;
  size_t bytes;  // mapped (a whole number of pages)
};

struct Pool {
  std::mutex mu;
  std::list<Block> free_blocks;  // least recently freed first
  size_t cached = 0;             // bytes in free_blocks
  size_t limit = size_t(256) << 20;
  size_t in_use = 0;  // bytes held by live tensors
  size_t peak_in_use = 0;
  uint64_t hits = 0, misses = 0;
};

Pool& pool() {
  static Pool* p = [] {
    auto* q = new Pool();
    // fork: the forking thread takes the lock first, so neither side of the fork inherits it
    // held by a thread that does not exist there; each side then unlocks its copy
    pthread_atfork([] { pool().mu.lock(); }, [] { pool().mu.unlock(); }, [] { pool().mu.unlock(); });
    return q;
  }();
  return *p;
}

void unmap_all(std::vector<Block>& blocks) {
  for (const Block& b : blocks) munmap(b.ptr, b.bytes);
}

// A block of at least `bytes` (a multiple of kPage): a kept one no more than 1/4 larger, the
// smallest such, else a fresh mapping (null when the system has no memory).
void* take(size_t bytes, size_t* mapped) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> g(p.mu);
    auto best = p.free_blocks.end();
    for (auto it = p.free_blocks.begin(); it != p.free_blocks.end(); ++it)
      if (it->bytes >= bytes && it->bytes - bytes <= bytes / 4 &&
          (best == p.free_blocks.end() || it->bytes < best->bytes))
        best = it;
    if (best != p.free_blocks.end()) {
      void* ptr = best->ptr;
      *mapped = best->bytes;
      p.cached -= best->bytes;
      p.free_blocks.erase(best);
      ++p.hits;
      p.in_use += *mapped;
      if (p.in_use > p.peak_in_use) p.peak_in_use = p.in_use;
      return ptr;
    }
    ++p.misses;
  }
  void* ptr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ptr == MAP_FAILED) return nullptr;
  *mapped = bytes;
  std::lock_guard<std::mutex> g(p.mu);
  p.in_use += bytes;
  if (p.in_use > p.peak_in_use) p.peak_in_use = p.in_use;
  return ptr;
}

// A block the caller no longer holds: kept (the least recently freed evicted to stay within the
// limit) or, when it alone is over the limit, unmapped.
void give(void* ptr, size_t bytes) {
  Pool& p = pool();
  std::vector<Block> evicted;
  {
    std::lock_guard<std::mutex> g(p.mu);
    p.in_use -= bytes;
    if (bytes > p.limit) {
      evicted.push_back({ptr, bytes});
    } else {
      while (p.cached + bytes > p.limit && !p.free_blocks.empty()) {
        evicted.push_back(p.free_blocks.front());
        p.cached -= p.free_blocks.front().bytes;
        p.free_blocks.pop_front();
      }
      p.free_blocks.push_back({ptr, bytes});
      p.cached += bytes;
    }
  }
  unmap_all(evicted);  // outside the lock
}

// The DLPack tensor handed to torch, with its shape storage and its block.
struct Owned {
  mtgrpo::dlpack::ManagedTensor managed;
  int64_t shape[2];
  size_t mapped;
};

void owned_deleter(mtgrpo::dlpack::ManagedTensor* m) {
  auto* o = static_cast<Owned*>(m->manager_ctx);
  give(m->dl_tensor.data, o->mapped);
  delete o;
}

// A capsule torch has not consumed (torch renames the ones it takes to "used_dltensor").
void capsule_destructor(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, "dltensor")) {
    auto* m = static_cast<mtgrpo::dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    m->deleter(m);
  }
}

// An uninitialised C-contiguous CPU buffer of shape [n0] (ndim 1) or [n0, n1] (ndim 2) and
// DLPack dtype (code, bits), as a "dltensor" capsule for torch.from_dlpack; None when the cache
// is off (limit 0): the caller allocates the output itself.
py::object cache_empty(int ndim, int64_t n0, int64_t n1, int code, int bits) {
  if (ndim != 1 && ndim != 2) mtgrpo::fail("ndim: expected 1 or 2, got ", ndim);
  const int64_t shape[2] = {n0, n1};
  if (!((code == 2 && (bits == 16 || bits == 32 || bits == 64)) || (code == 4 && bits == 16)))
    mtgrpo::fail("dtype: expected float16/32/64 or bfloat16 (DLPack code 2 or 4), got code ", code, " bits ", bits);
  uint64_t elems = 1;
  for (int d = 0; d < ndim; ++d) {
    const int64_t n = shape[d];
    if (n < 0) mtgrpo::fail("shape: negative extent ", n);
    if (n != 0 && elems > (uint64_t(1) << 56) / uint64_t(n)) mtgrpo::fail("shape: too many elements");
    elems *= uint64_t(n);
  }
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> g(p.mu);
    if (p.limit == 0) return py::none();
  }
  const size_t bytes = std::max<size_t>(kPage, (elems * uint64_t(bits / 8) + kPage - 1) / kPage * kPage);
  size_t mapped = 0;
  void* ptr = take(bytes, &mapped);
  if (ptr == nullptr) throw std::bad_alloc();
  auto* o = new Owned();
  o->mapped = mapped;
  for (int d = 0; d < ndim; ++d) o->shape[d] = shape[d];
  auto& t = o->managed.dl_tensor;
  t.data = ptr;
  t.device = {1, 0};
  t.ndim = ndim;
  t.dtype = {static_cast<uint8_t>(code), static_cast<uint8_t>(bits), 1};
  t.shape = o->shape;
  t.strides = nullptr;
  t.byte_offset = 0;
  o->managed.manager_ctx = o;
  o->managed.deleter = owned_deleter;
  return py::reinterpret_steal<py::object>(PyCapsule_New(&o->managed, "dltensor", capsule_destructor));
}

py::dict cache_info() {
  Pool& p = pool();
  std::lock_guard<std::mutex> g(p.mu);
  py::dict d;
  d["cached_bytes"] = p.cached;
  d["cached_blocks"] = p.free_blocks.size();
  d["in_use_bytes"] = p.in_use;
  d["peak_in_use_bytes"] = p.peak_in_use;
  d["limit_bytes"] = p.limit;
  d["hits"] = p.hits;
  d["misses"] = p.misses;
  return d;
}

// Unmaps every kept block; returns the bytes released.
size_t cache_release() {
  Pool& p = pool();
  std::vector<Block> blocks;
  size_t released = 0;
  {
    std::lock_guard<std::mutex> g(p.mu);
    blocks.assign(p.free_blocks.begin(), p.free_blocks.end());
    p.free_blocks.clear();
    released = p.cached;
    p.cached = 0;
  }
  unmap_all(blocks);
  return released;
}

void cache_set_limit(int64_t limit_bytes) {
  if (limit_bytes < 0) mtgrpo::fail("limit_bytes: expected >= 0, got ", limit_bytes);
  Pool& p = pool();
  std::vector<Block> evicted;
  {
    std::lock_guard<std::mutex> g(p.mu);
    p.limit = static_cast<size_t>(limit_bytes);
    while (p.cached > p.limit && !p.free_blocks.empty()) {
      evicted.push_back(p.free_blocks.front());
      p.cached -= p.free_blocks.front().bytes;
      p.free_blocks.pop_front();
    }
  }
  unmap_all(evicted);
}

void cache_reset_peak() {
  Pool& p = pool();
  std::lock_guard<std::mutex> g(p.mu);
  p.peak_in_use = p.in_use;
}

}  // namespace

void register_cpu_cache(py::module_& m) {
  m.def("cpu_cache_empty", &cache_empty, py::arg("ndim"), py::arg("n0"), py::arg("n1"), py::arg("code"),
        py::arg("bits"),
        "An uninitialised CPU buffer from the output cache, as a DLPack capsule (None: the cache is off)");
  m.def("cpu_cache_info", &cache_info, "The output cache's counters");
  m.def("cpu_cache_release", &cache_release, "Unmap every kept buffer; returns the bytes released");
  m.def("cpu_cache_set_limit", &cache_set_limit, py::arg("limit_bytes"), "Bound the kept (free) bytes");
  m.def("cpu_cache_reset_peak", &cache_reset_peak, "Peak in-use bytes := in-use bytes now");
}
