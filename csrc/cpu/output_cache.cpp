// The CPU output cache (see output_cache.h).
#include "cpu/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <atomic>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <vector>

namespace hierkern::cpu {
namespace {

constexpr size_t kPage = 4096;

struct Block {
  void* ptr;
  size_t bytes;
};

size_t cap_from_env() {
  const char* e = std::getenv("HIERKERN_CPU_CACHE_MB");
  if (e == nullptr || *e == '\0') return size_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(e, &end, 10);
  TORCH_CHECK(end != e && *end == '\0' && mb >= 0, "hierkern: HIERKERN_CPU_CACHE_MB must be a number of MiB >= 0, got '",
              e, "'");
  return size_t(mb) << 20;
}

// Free blocks, oldest first. A block that does not fit under the cap pushes out the oldest ones (the
// shapes a program uses now are the ones worth keeping); one larger than the cap is not kept.
class Cache {
 public:
  static Cache& get() {
    static Cache* c = new Cache();  // never destroyed: tensors may be freed during static destruction
    return *c;
  }
  size_t cap() const { return cap_; }

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> g(mu_);
    for (auto it = free_.rbegin(); it != free_.rend(); ++it)
      if (it->bytes == bytes) {
        void* p = it->ptr;
        cached_ -= bytes;
        free_.erase(std::next(it).base());
        return p;
      }
    return nullptr;
  }

  void put(void* p, size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (bytes > cap_) {
        drop.push_back(p);
      } else {
        while (cached_ + bytes > cap_) {
          drop.push_back(free_.front().ptr);
          cached_ -= free_.front().bytes;
          free_.pop_front();
        }
        free_.push_back({p, bytes});
        cached_ += bytes;
      }
    }
    for (void* q : drop) c10::free_cpu(q);
  }

  int64_t release() {
    std::deque<Block> all;
    {
      std::lock_guard<std::mutex> g(mu_);
      all.swap(free_);
      cached_ = 0;
    }
    int64_t freed = 0;
    for (const Block& b : all) {
      c10::free_cpu(b.ptr);
      freed += static_cast<int64_t>(b.bytes);
    }
    return freed;
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> g(mu_);
    return cached_;
  }

  std::atomic<size_t> live{0};  // bytes of blocks held by tensors

 private:
  Cache() : cap_(cap_from_env()) {}
  std::mutex mu_;
  std::deque<Block> free_;
  size_t cached_ = 0;
  const size_t cap_;
};

void report(void* p, int64_t delta) {
  Cache& c = Cache::get();
  const size_t live = c.live.fetch_add(static_cast<size_t>(delta)) + static_cast<size_t>(delta);
  c10::reportMemoryUsageToProfiler(p, delta, live, live + c.cached_bytes(), c10::Device(c10::DeviceType::CPU));
}

void delete_block(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  report(b->ptr, -static_cast<int64_t>(b->bytes));
  Cache::get().put(b->ptr, b->bytes);
  delete b;
}

class CachedCpuAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    Cache& c = Cache::get();
    if (n < static_cast<size_t>(kMinCachedBytes) || c.cap() == 0) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + kPage - 1) / kPage * kPage;
    void* p = c.take(bytes);
    if (p == nullptr) {
      try {
        p = c10::alloc_cpu(bytes);
      } catch (const c10::Error&) {  // out of memory: give the cached blocks back and try once more
        c.release();
        p = c10::alloc_cpu(bytes);
      }
    }
    report(p, static_cast<int64_t>(bytes));
    return {p, new Block{p, bytes}, &delete_block, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  TORCH_INTERNAL_ASSERT(opts.device().is_cpu());
  static auto* alloc = new CachedCpuAllocator();  // never destroyed, as the cache
  return at::detail::empty_generic(sizes, alloc, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(opts.dtype()), std::nullopt);
}

at::Tensor empty_like_cached(const at::Tensor& t) {
  return t.is_contiguous() ? empty_cached(t.sizes(), t.options()) : at::empty_like(t);
}

int64_t release_cached_blocks() { return Cache::get().release(); }

}  // namespace hierkern::cpu
