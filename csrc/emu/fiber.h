// Fibers for the emulated CUDA backend: one user-space context per CUDA thread.
//
// A switch saves the callee-saved registers and the floating-point control words on the running
// stack and loads the other context's stack pointer (x86-64: hand-written, ~20 instructions; other
// hosts: ucontext, ~50x slower because glibc's swapcontext makes a sigprocmask system call).
// Fibers never unwind across a switch: the entry function catches everything (runtime.cpp).
#pragma once
#include <cstddef>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace pyllmops {
namespace emu {

struct FiberContext {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// Prepares `ctx` to run entry(arg) on the stack [stack, stack + size) at its first switch_to.
void fiber_init(FiberContext* ctx, void* stack, size_t size, void (*entry)(void*), void* arg);

// Saves the running context into `from` and resumes `to`.
void fiber_switch(FiberContext* from, FiberContext* to);

}  // namespace emu
}  // namespace pyllmops
