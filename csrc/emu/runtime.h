// The emulated CUDA backend's host side, shared by runtime.cpp, ptx.cpp and the bindings.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace pyllmops {
namespace emu {

// How fibers and blocks are ordered: forward (ascending linear index), reverse, or a seeded random
// permutation redrawn at every scheduling pass. A kernel whose outputs depend on the order has a race.
enum class Schedule : int { forward = 0, reverse = 1, random = 2 };

struct Config {
  Schedule schedule = Schedule::forward;
  uint64_t seed = 0;
  unsigned breaks = 0;  // Break bits (emu.h): deliberately wrong mma / ldmatrix / barriers, for negative controls
  int arch = 90;        // launch limits of sm_80 or sm_90
};

// Read from PYLLMOPS_EMU_SCHEDULE (forward|reverse|random), PYLLMOPS_EMU_SEED, PYLLMOPS_EMU_BREAK
// (comma-separated: mma, ldmatrix, barrier) and PYLLMOPS_EMU_ARCH (80|90) at first use; an unknown value
// raises ValueError naming the variable.
Config config();
void set_config(const Config& c);

// The parsers of those settings (shared by the environment and _C.emu_set_config); `name` is for messages.
Schedule parse_schedule(const std::string& v, const char* name);
unsigned parse_break(const std::string& v, const char* name);
int parse_arch(int arch, const char* name);

// Per-block shared memory limits of the emulated arch (static: 48 KB; static + dynamic opt-in).
size_t max_shared_optin();

// Buffers whose end abuts an inaccessible page: an access past the end faults and the launch reports
// it as an out-of-bounds access. The Python layer allocates kernel outputs with them in emulated builds.
void* guarded_alloc(size_t bytes);
void guarded_free(void* data);

}  // namespace emu
}  // namespace pyllmops
