// The vector width of the CPU kernels, shared by csrc/cpu (vec.h) and the
// FMA-peak probe in benchmarks/ (compiled there at benchmark time), so the probe
// measures the vectors the kernels run.  Defines ZM_VBYTES (16, 32 or 64).
#pragma once

// The vector width follows the ISA the build targets: 64 bytes (16 floats, one zmm) with
// AVX-512, 32 bytes (8, one ymm) with AVX / AVX2, 16 bytes (4: xmm with SSE, a NEON q
// register) otherwise.  A vector wider than the ISA's registers is split by GCC into
// several, so e.g. the 24 accumulators of the AVX-512 microkernel would be 48 ymm on AVX2
// (which has 16) and everything spills.  CPUs whose FP units are 128 bits wide although
// they run AVX (AMD Zen 1, -march=znver1, which -march=native picks there; Bulldozer and
// Jaguar) split every 256-bit op in two: ymm gains no FMA lanes a second there, costs two
// macro-ops of the out-of-order window an op and pads keys to 8; xmm vectors (still FMA /
// VEX) were 3-6% faster on the attention kernels (GCC's znver1 tuning prefers 128 bits too).
// -DZM_VBYTES=16 (or 32) overrides the choice below AVX-512, e.g. to compare widths.
#if defined(__AVX512F__)
#if defined(ZM_VBYTES) && ZM_VBYTES != 64
#error "zeromask: the AVX-512 paths need ZM_VBYTES=64"
#endif
#define ZM_VBYTES 64
#elif !defined(ZM_VBYTES)
#if defined(__AVX__) && !defined(__znver1__) && !defined(__bdver1__) && !defined(__bdver2__) && \
    !defined(__bdver3__) && !defined(__bdver4__) && !defined(__btver2__)
#define ZM_VBYTES 32
#else
#define ZM_VBYTES 16
#endif
#elif ZM_VBYTES != 16 && !(ZM_VBYTES == 32 && defined(__AVX__))
#error "zeromask: ZM_VBYTES must be 16, or 32 with AVX, without AVX-512"
#endif
