#include "isa.h"

#include <cstdlib>
#include <cstring>

namespace hotloop::cpu {

static Isa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::base;
}

Isa runtime_isa() {
  static const Isa best = detect();
  const char* forced = std::getenv("HOTLOOP_CPU_ISA");
  if (forced == nullptr) return best;
  Isa want = best;
  if (std::strcmp(forced, "base") == 0) want = Isa::base;
  else if (std::strcmp(forced, "avx2") == 0) want = Isa::avx2;
  else if (std::strcmp(forced, "avx512") == 0) want = Isa::avx512;
  return static_cast<int>(want) < static_cast<int>(best) ? want : best;  // never above what the CPU has
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "base";
  }
}

}  // namespace hotloop::cpu
