// The compute ceiling the benchmark report compares with: this CPU's fp32 FMA peak.
//
// Benchmark-only code, so it is not part of the installed package: runner.py builds it at
// benchmark time with torch.utils.cpp_extension.load (cached under torch's extensions
// folder) with the compiler flags setup.py gives csrc/cpu, so its vectors are the ones the
// CPU kernels are built with.  Where the build fails, the report has no ceiling and says why.
//
// fp32 FLOP/s of vector FMAs on every torch thread: each thread runs 12 independent FMA
// chains in registers of the kernels' vector width (the widest the build targets, but 128
// bits on CPUs with 128-bit FP units, which run as many FMA lanes a second with either; the
// choice of csrc/cpu/vector_width.h, which the kernels include, ZM_VBYTES included) with no
// memory traffic, more chains than FMA latency x FMA pipes on current x86 cores, for
// `iters` steps.  No kernel compiled with the same flags does fp32 arithmetic faster on
// this machine.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "../csrc/cpu/vector_width.h"  // the kernels' vector width (ZM_VBYTES)

namespace {

typedef float vnat __attribute__((vector_size(ZM_VBYTES)));

double fma_peak(int64_t iters) {
  if (iters <= 0) throw std::runtime_error("zeromask: fma_peak needs iters > 0");
  const int64_t nth = std::max<int64_t>(1, at::get_num_threads());
  std::vector<float> sink(nth, 0.f);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, nth, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t th = lo; th < hi; ++th) {
      const vnat z = {};
      const vnat m = z + 0.999999f, c = z + 1e-7f;
      vnat a0 = z + 0.f, a1 = z + 1.f, a2 = z + 2.f, a3 = z + 3.f, a4 = z + 4.f, a5 = z + 5.f,
           a6 = z + 6.f, a7 = z + 7.f, a8 = z + 8.f, a9 = z + 9.f, a10 = z + 10.f, a11 = z + 11.f;
      for (int64_t it = 0; it < iters; ++it) {
        a0 = a0 * m + c; a1 = a1 * m + c; a2 = a2 * m + c; a3 = a3 * m + c;
        a4 = a4 * m + c; a5 = a5 * m + c; a6 = a6 * m + c; a7 = a7 * m + c;
        a8 = a8 * m + c; a9 = a9 * m + c; a10 = a10 * m + c; a11 = a11 * m + c;
      }
      const vnat s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
      sink[th] = s[0];
    }
  });
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  volatile float keep = sink[0];  // the chains' results are used
  (void)keep;
  constexpr int lanes = sizeof(vnat) / sizeof(float);
  return 2.0 * lanes * 12.0 * static_cast<double>(iters) * static_cast<double>(nth) / dt;
}

int64_t vector_bits() { return 8 * static_cast<int64_t>(sizeof(vnat)); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "zeromask benchmarks: the fp32 FMA peak of this CPU (the report's compute ceiling)";
  m.def("fma_peak", &fma_peak, "fp32 FMA FLOP/s on every torch thread", pybind11::arg("iters"));
  m.def("vector_bits", &vector_bits, "width of the vectors fma_peak uses, in bits");
}
