#include "emu/fiber.h"

#include <cstdint>

namespace pyllmops {
namespace emu {

#if defined(__x86_64__)

extern "C" void pyllmops_emu_switch(void** save_sp, void* load_sp);
extern "C" void pyllmops_emu_trampoline();

// System V x86-64: rbx, rbp, r12-r15 are callee-saved, as are the MXCSR control bits and the x87
// control word. The saved frame, from the lowest address: [mxcsr | x87 cw], r15, r14, r13, r12,
// rbx, rbp, return address.
asm(R"(
  .text
  .globl pyllmops_emu_switch
  .type pyllmops_emu_switch, @function
pyllmops_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size pyllmops_emu_switch, .-pyllmops_emu_switch

  .globl pyllmops_emu_trampoline
  .type pyllmops_emu_trampoline, @function
pyllmops_emu_trampoline:
  movq %r13, %rdi
  callq *%r12
  ud2
  .size pyllmops_emu_trampoline, .-pyllmops_emu_trampoline
)");

void fiber_init(FiberContext* ctx, void* stack, size_t size, void (*entry)(void*), void* arg) {
  auto top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<uint64_t*>(top - 8);  // return address: the trampoline (rsp % 16 == 0 after ret)
  slot[0] = reinterpret_cast<uint64_t>(&pyllmops_emu_trampoline);
  slot[-1] = 0;                                      // rbp
  slot[-2] = 0;                                      // rbx
  slot[-3] = reinterpret_cast<uint64_t>(entry);      // r12
  slot[-4] = reinterpret_cast<uint64_t>(arg);        // r13
  slot[-5] = 0;                                      // r14
  slot[-6] = 0;                                      // r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  auto* ctl = reinterpret_cast<uint32_t*>(&slot[-7]);
  ctl[0] = mxcsr;
  ctl[1] = fpucw;
  ctx->sp = &slot[-7];
}

void fiber_switch(FiberContext* from, FiberContext* to) { pyllmops_emu_switch(&from->sp, to->sp); }

#else

void fiber_init(FiberContext* ctx, void* stack, size_t size, void (*entry)(void*), void* arg) {
  getcontext(&ctx->uc);
  ctx->uc.uc_stack.ss_sp = stack;
  ctx->uc.uc_stack.ss_size = size;
  ctx->uc.uc_link = nullptr;
  // makecontext passes int arguments: split the pointer in two halves.
  const auto bits = reinterpret_cast<uintptr_t>(arg);
  static void (*s_entry)(void*) = nullptr;
  s_entry = entry;
  makecontext(&ctx->uc, reinterpret_cast<void (*)()>(+[](unsigned hi, unsigned lo) {
                s_entry(reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo));
              }),
              2, static_cast<unsigned>(bits >> 32), static_cast<unsigned>(bits & 0xffffffffu));
}

void fiber_switch(FiberContext* from, FiberContext* to) { swapcontext(&from->uc, &to->uc); }

#endif

}  // namespace emu
}  // namespace pyllmops
