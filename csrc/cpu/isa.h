// Runtime choice of the instruction set for the CPU kernels.
//
// Each kernel's body lives in a header included by one small translation unit per ISA (`X_avx512.cpp`,
// `X_avx2.cpp`, `X_base.cpp`) that sets HOTLOOP_ISA / HOTLOOP_ISA_TARGET first. The body is compiled under
// `#pragma GCC target(HOTLOOP_ISA_TARGET)` inside namespace hotloop::cpu::HOTLOOP_ISA, so template instances
// of different ISAs never merge at link time, and the wheel runs on any x86-64 (no -march=native).
#pragma once

namespace hotloop::cpu {

enum class Isa { base, avx2, avx512 };

// Best ISA this CPU supports, lowered by HOTLOOP_CPU_ISA=base|avx2|avx512 (tests use it to cover every path).
Isa runtime_isa();

const char* isa_name(Isa isa);

}  // namespace hotloop::cpu

// Used inside the per-ISA translation units. `#pragma GCC target` does not expand macros; _Pragma of a
// stringised argument does.
#define HOTLOOP_DO_PRAGMA(x) _Pragma(#x)
#define HOTLOOP_TARGET_PRAGMA(isa_string) HOTLOOP_DO_PRAGMA(GCC target(isa_string))
#define HOTLOOP_ISA_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2,prefer-vector-width=512"
#define HOTLOOP_ISA_AVX2_TARGET "avx2,fma,f16c,bmi2"
