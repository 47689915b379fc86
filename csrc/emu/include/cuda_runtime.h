// Emulated CUDA backend (PYLLMOPS_CUDA=emu): this directory comes first on the include path, so a
// kernel source's `#include <cuda_runtime.h>` reads the toolkit's header (types, host-mode fp16/bf16)
// and then the emulation of what nvcc provides (emu/emu.h).
#pragma once
#include_next <cuda_runtime.h>
#include "emu/emu.h"
