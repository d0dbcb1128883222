// Runtime choice of the instruction set for the CPU kernels.
//
// An op with SIMD variants has its body in `X_kernel.h`, compiled once per ISA by a two-line translation unit
// `X_<isa>.cpp` (`#define HOTLOOP_ISA <isa>`, then `#include "X_kernel.h"`). The kernel header wraps its body
// (after its standard includes) in
//   #if HOTLOOP_ISA_COMPILED
//   HOTLOOP_ISA_BEGIN
//   namespace hotloop::cpu::HOTLOOP_ISA { ... }
//   HOTLOOP_ISA_END
//   #endif
// so the body is compiled under `#pragma GCC target(<that ISA's flags>)` inside its own namespace: template
// instances of different ISAs never merge at link time, and the wheel runs on any x86-64 (no -march=native).
// The standard headers must come before HOTLOOP_ISA_BEGIN: under the pragma their inline functions would be
// emitted with AVX instructions, and the linker may keep that copy for the base code too.
#pragma once

namespace hotloop::cpu {

enum class Isa { base, avx2, avx512 };

// Best ISA this CPU supports, lowered by HOTLOOP_CPU_ISA=base|avx2|avx512 (tests use it to cover every path).
Isa runtime_isa();

const char* isa_name(Isa isa);

}  // namespace hotloop::cpu

// The avx2 and avx512 units are built on x86-64 only; elsewhere their files compile to nothing.
#if defined(__x86_64__)
#define HOTLOOP_ISA_COMPILED_avx2 1
#define HOTLOOP_ISA_COMPILED_avx512 1
#else
#define HOTLOOP_ISA_COMPILED_avx2 0
#define HOTLOOP_ISA_COMPILED_avx512 0
#endif
#define HOTLOOP_ISA_COMPILED_base 1

// Used in the kernel headers, where the unit has defined HOTLOOP_ISA. Each expands to the member of its family
// named by HOTLOOP_ISA (two-level paste, so HOTLOOP_ISA is expanded first). `#pragma GCC target` does not
// expand macros; _Pragma of a stringised argument does. The base unit gets no pragma at all.
#define HOTLOOP_ISA_CAT_(a, b) a##b
#define HOTLOOP_ISA_CAT(a, b) HOTLOOP_ISA_CAT_(a, b)
#define HOTLOOP_ISA_PRAGMA(x) _Pragma(#x)
#define HOTLOOP_ISA_COMPILED HOTLOOP_ISA_CAT(HOTLOOP_ISA_COMPILED_, HOTLOOP_ISA)
#define HOTLOOP_ISA_BEGIN HOTLOOP_ISA_CAT(HOTLOOP_ISA_BEGIN_, HOTLOOP_ISA)
#define HOTLOOP_ISA_END HOTLOOP_ISA_CAT(HOTLOOP_ISA_END_, HOTLOOP_ISA)
#define HOTLOOP_ISA_BEGIN_base
#define HOTLOOP_ISA_END_base
#define HOTLOOP_ISA_BEGIN_avx2 \
  HOTLOOP_ISA_PRAGMA(GCC push_options) HOTLOOP_ISA_PRAGMA(GCC target("avx2,fma,f16c,bmi2"))
#define HOTLOOP_ISA_END_avx2 HOTLOOP_ISA_PRAGMA(GCC pop_options)
#define HOTLOOP_ISA_BEGIN_avx512                                                                            \
  HOTLOOP_ISA_PRAGMA(GCC push_options)                                                                      \
  HOTLOOP_ISA_PRAGMA(GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2,prefer-vector-width=512"))
#define HOTLOOP_ISA_END_avx512 HOTLOOP_ISA_PRAGMA(GCC pop_options)
