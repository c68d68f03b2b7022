// The cnnbp operator library: every schema in one place, and their CPU kernels.
// Python reaches them as torch.ops.cnnbp.<name>; torch_cnnbp/ops.py adds fake kernels and autograd.

#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cnnbp.h"
#include "gemm.h"
#include "simd.h"

namespace cnnbp {

void check_floating_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, but it is on ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor");
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16, but got ", type);
}

namespace {

// Each thread's scratch buffers, a stack: Scratch objects live in scopes, so they are freed in the
// reverse order of their allocation. The stack's memory is blocks mapped from the kernel (Linux; not
// shared with malloc's heaps), kept for the thread's next calls: a call that makes the same requests
// as one before finds them in the same blocks, already resident. A request that fits neither the
// current block nor the next replaces the blocks after the current one (all empty) by one of at
// least the size mapped so far; at most kStackMost in all, beyond which requests go to malloc.
constexpr size_t kStackMost = size_t(8) << 20;
constexpr size_t kStackLeast = size_t(64) << 10;

char* map_bytes(size_t bytes) {
#if defined(__linux__)
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : static_cast<char*>(p);
#else
  return static_cast<char*>(std::aligned_alloc(64, bytes));
#endif
}

void unmap_bytes(char* p, size_t bytes) {
#if defined(__linux__)
  munmap(p, bytes);
#else
  (void)bytes;
  std::free(p);
#endif
}

class ScratchStack {
 public:
  ~ScratchStack() {
    for (const Block& b : blocks_) unmap_bytes(b.base, b.size);
  }

  // Null where the stack has no room and may not grow: the caller allocates elsewhere.
  char* push(size_t bytes) {
    if (blocks_.empty() || blocks_[cur_].top + bytes > blocks_[cur_].size) {
      const size_t next = blocks_.empty() ? 0 : cur_ + 1;
      if (next >= blocks_.size() || bytes > blocks_[next].size) {
        for (size_t b = next; b < blocks_.size(); ++b) {
          mapped_ -= blocks_[b].size;
          unmap_bytes(blocks_[b].base, blocks_[b].size);
        }
        blocks_.resize(next);
        const size_t page = 4096;
        const size_t size = (std::max({bytes, mapped_, kStackLeast}) + page - 1) / page * page;
        char* base = mapped_ + size <= kStackMost ? map_bytes(size) : nullptr;
        if (base == nullptr) return nullptr;
        blocks_.push_back({base, size, 0});
        mapped_ += size;
      }
      cur_ = next;
    }
    Block& b = blocks_[cur_];
    char* p = b.base + b.top;
    b.top += bytes;
    return p;
  }

  // p: the last buffer pushed and not popped.
  void pop(char* p, size_t bytes) {
    Block& b = blocks_[cur_];
    TORCH_INTERNAL_ASSERT(p + bytes == b.base + b.top, "cnnbp: scratch buffers freed out of order");
    b.top -= bytes;
    if (b.top == 0 && cur_ > 0) --cur_;
  }

  bool holds(const char* p) const {
    return !blocks_.empty() && p >= blocks_[cur_].base && p < blocks_[cur_].base + blocks_[cur_].size;
  }

 private:
  struct Block {
    char* base;
    size_t size, top;
  };
  std::vector<Block> blocks_;  // blocks_[cur_] holds the last buffer pushed; the ones after it are empty
  size_t cur_ = 0, mapped_ = 0;
};

thread_local ScratchStack scratch_stack;

// Every buffer a whole number of cache lines, so that the next one starts on a line.
size_t in_lines(size_t bytes) {
  return (bytes + 63) / 64 * 64;
}

}  // namespace

void* scratch_alloc(size_t bytes) {
  bytes = in_lines(bytes);
  if (char* p = scratch_stack.push(bytes)) return p;
  void* p = std::aligned_alloc(64, bytes);
  TORCH_CHECK(p != nullptr, "cnnbp: out of memory for a ", bytes, "-byte scratch buffer");
  return p;
}

void scratch_free(void* p, size_t bytes) {
  if (p == nullptr) return;
  char* c = static_cast<char*>(p);
  if (scratch_stack.holds(c))
    scratch_stack.pop(c, in_lines(bytes));
  else
    std::free(p);
}

at::Tensor empty_result(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // CNNBP_HUGEPAGES=0 turns the hint off (read once).
  static const bool advise = [] {
    const char* v = std::getenv("CNNBP_HUGEPAGES");
    return !(v && std::string(v) == "0");
  }();
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.nbytes();
  // Only results beyond glibc's largest mmap threshold (32 MiB): those get fresh pages from the
  // kernel on every allocation. Smaller ones come back from its heap, already faulted in: advised
  // there (a first version took 8 MiB and up), they gained nothing, and a 1x1 layer over a 26 MB
  // gradient took 2.1x as long.
  if (advise && bytes > 16 * kHuge) {
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + bytes) & ~(kHuge - 1);
    // A hint: where the kernel has no huge pages to give (THP "never"), nothing changes.
    if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// Diagnostic: how many distinct intra-op threads ran the body of an at::parallel_for over `items`
// items with grain 1, as compiled into this extension. The kernels parallelise only if this
// exceeds 1 when torch.get_num_threads() > 1 (the build must compile them with OpenMP).
int64_t parallel_threads(int64_t items) {
  std::atomic<uint64_t> seen{0};
  at::parallel_for(0, items, 1, [&](int64_t, int64_t) {
    seen.fetch_or(uint64_t(1) << (at::get_thread_num() % 64));
  });
  return __builtin_popcountll(seen.load());
}

// Diagnostic: which code paths this process runs, e.g. "isa=avx512 gemm=blas pool=avx512/avx2"
// (csrc/simd.h, gemm.h; pool: the widths of max_pool2d's select loops / of its loops that combine
// comparisons).
std::string build_paths() {
  return std::string("isa=") + isa_name(active_isa()) + " gemm=" + gemm_backend() + " pool=" +
         isa_name(capped_isa(blend_isa())) + "/" + isa_name(capped_isa(compare_isa()));
}

TORCH_LIBRARY(cnnbp, m) {
  // padding is (top, bottom, left, right).
  m.def("conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, "
        "int[2] dilation, int groups) -> Tensor");
  // Returns (grad_input, grad_weight, grad_bias); entries not asked for in output_mask are empty.
  m.def("conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
        "int[4] padding, int[2] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Returns (output, indices); indices are flat positions h * W + w inside each input plane.
  m.def("max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, bool ceil_mode) -> (Tensor, Tensor)");
  // kernel_size, stride, padding, dilation: the window of the forward that made indices (all four or
  // none). Given, channels_last windows that tile the input gather rather than scatter; the result is the same.
  m.def("max_pool2d_backward(Tensor grad_output, Tensor indices, SymInt[4] input_size, int[2]? kernel_size=None, "
        "int[2]? stride=None, int[2]? padding=None, int[2]? dilation=None) -> Tensor");
  m.def("_parallel_threads(int items) -> int", &parallel_threads);
  m.def("_paths() -> str", &build_paths);
  m.def("_conv2d_plan(int[4] input_size, int[4] weight_size, int[2] stride, int[4] padding, int[2] dilation, "
        "int groups, bool backward) -> int[]",
        &conv2d_plan);
}

TORCH_LIBRARY_IMPL(cnnbp, CPU, m) {
  m.impl("conv2d", &conv2d_forward);
  m.impl("conv2d_backward", &conv2d_backward);
  m.impl("max_pool2d", &max_pool2d_forward);
  m.impl("max_pool2d_backward", &max_pool2d_backward);
}

}  // namespace cnnbp

// A bare Python module: importing torch_cnnbp._C loads this library, which registers the ops.
static PyModuleDef cnnbp_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&cnnbp_module); }
