// Binding-layer checks of an NF4 weight, shared by every family that takes one (nf4, lora).
#pragma once
#include "bindings.h"
#include "nf4/nf4.h"

namespace pyllmops {
namespace nf4 {

// blocksize must be a power of two in [kMinBlocksize, kMaxBlocksize]; throws naming `name`.
void check_blocksize(int64_t blocksize, const char* name);

// Checks the scale buffers of an NF4 tensor with n_blocks blocks (plain fp32 absmax, or the nested
// uint8 codes + fp32 absmax2 + 256-entry code + offset: all or none) against `ref`'s device, and
// returns the Scales the kernels read.
Scales make_scales(const TensorView& absmax, const bind::OptView& nested_absmax, const bind::OptView& nested_code,
                   const bind::OptView& nested_offset, int64_t nested_blocksize, int64_t n_blocks,
                   const TensorView& ref, const char* ref_name);

}  // namespace nf4
}  // namespace pyllmops
