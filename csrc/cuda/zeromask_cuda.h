// Interface between the CUDA device code (zeromask_cuda_kernels.cu: plain CUDA C++ on raw
// pointers, no ATen/c10 headers) and the torch binding (zeromask_cuda.cpp: no CUDA headers).
// The stream comes from Python as an integer (torch.cuda.current_stream().cuda_stream).
#pragma once
#include <cstdint>

namespace zmc {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Maximum head dim served by the CUDA kernels (shared-memory tiles are sized for it).
constexpr int kMaxHeadDim = 128;

struct AttnParams {
  // q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D): element strides of dims 0..2 (dim 3 is 1)
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t qs0 = 0, qs1 = 0, qs2 = 0, ks0 = 0, ks1 = 0, ks2 = 0, vs0 = 0, vs1 = 0, vs2 = 0;
  int B = 0, Hq = 0, Hkv = 0, Lq = 0, Lk = 0, D = 0, R = 0;
  bool score = false, causal = false, interleaved = false;
  float sm_scale = 1.f, zs = 1.f;
  const bool* key_zero = nullptr;    // (B, Lk) or null
  const int32_t* seqlens = nullptr;  // (B,) or null
  const float* radius = nullptr;     // (R/2,) or null
  const float* theta_q = nullptr;    // (B, Lq) or null (no rotary on q)
  const float* pos_q = nullptr;
  const float* theta_k = nullptr;    // (B, Lk) or null
  const float* pos_k = nullptr;
  // forward outputs: out (B, Hq, Lq, D) contiguous in q's dtype, lse (B, Hq, Lq) float32
  void* out = nullptr;
  float* lse = nullptr;
  // backward inputs / outputs (contiguous); the float accumulators must be zeroed
  const void* dout = nullptr;
  const void* out_in = nullptr;
  const float* lse_in = nullptr;
  float* delta = nullptr;     // scratch (B, Hq, Lq)
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* dtheta_q = nullptr;  // (B, Lq), accumulated atomically
  float* dtheta_k = nullptr;  // (B, Lk)
  float* dradius = nullptr;   // (R/2,)
  float* dzs = nullptr;       // (1,)
};

struct RotaryParams {
  const void* x = nullptr;
  int64_t xs0 = 0, xs1 = 0, xs2 = 0;
  int B = 0, H = 0, L = 0, D = 0, R = 0;
  bool interleaved = false;
  const float* theta = nullptr;  // (B, L)
  const float* pos = nullptr;    // (B, L)
  const float* radius = nullptr; // (R/2,) or null
  void* y = nullptr;             // forward output, contiguous
  const void* dy = nullptr;      // backward input, contiguous
  void* dx = nullptr;            // contiguous
  float* dtheta = nullptr;       // (B, L), written (not accumulated)
  float* dradius = nullptr;      // (R/2,), accumulated atomically (zero it first)
};

// Each returns 0 (cudaSuccess) or the cudaError_t of the failed launch.
int attention_forward(const AttnParams& p, DType dtype, void* stream);
int attention_backward(const AttnParams& p, DType dtype, void* stream);
int rotary_forward(const RotaryParams& p, DType dtype, void* stream);
int rotary_backward(const RotaryParams& p, DType dtype, void* stream);
const char* error_string(int code);

}  // namespace zmc
