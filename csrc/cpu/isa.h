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
//
// The op's dispatch file declares the entry points with HOTLOOP_ISA_DECLARE and calls HOTLOOP_ISA_PICK:
//   HOTLOOP_ISA_DECLARE(void dino_loss(const DinoLossParams& p))
//   void dino_loss(const DinoLossParams& p) { HOTLOOP_ISA_PICK(dino_loss)(p); }
#pragma once

namespace hotloop::cpu {

enum class Isa { base, avx2, avx512 };

// Best ISA this CPU supports, lowered by HOTLOOP_CPU_ISA=base|avx2|avx512 (tests use it to cover every path).
Isa runtime_isa();

const char* isa_name(Isa isa);

// The entry point of runtime_isa() among an op's per-ISA ones. runtime_isa() is read on every call, so a
// HOTLOOP_CPU_ISA set while the process runs takes effect at the next call.
template <class Fn>
Fn isa_pick(Fn for_base, Fn for_avx2, Fn for_avx512) {
  switch (runtime_isa()) {
    case Isa::avx512: return for_avx512;
    case Isa::avx2: return for_avx2;
    default: return for_base;
  }
}

}  // namespace hotloop::cpu

// The avx2 and avx512 units are built on x86-64 only; elsewhere their files compile to nothing and the
// dispatch calls the base entry point directly.
// HOTLOOP_ISA_DECLARE(decl): declares the function `decl` in each built ISA's namespace (use it in hotloop::cpu).
// HOTLOOP_ISA_PICK(name): the function `name` compiled for runtime_isa().
#if defined(__x86_64__)
#define HOTLOOP_ISA_DECLARE(...) \
  namespace base { __VA_ARGS__; } namespace avx2 { __VA_ARGS__; } namespace avx512 { __VA_ARGS__; }
#define HOTLOOP_ISA_PICK(name) \
  ::hotloop::cpu::isa_pick(::hotloop::cpu::base::name, ::hotloop::cpu::avx2::name, ::hotloop::cpu::avx512::name)
#define HOTLOOP_ISA_COMPILED_avx2 1
#define HOTLOOP_ISA_COMPILED_avx512 1
#else
#define HOTLOOP_ISA_DECLARE(...) namespace base { __VA_ARGS__; }
#define HOTLOOP_ISA_PICK(name) ::hotloop::cpu::base::name
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
