// Emulated PTX warp-level matrix instructions (common/ptx.cuh's PYLLMOPS_EMU half).
//
// The lane-to-element maps below are written from the PTX ISA ("Parallel Thread Execution ISA",
// section numbers as in versions 8.x-9.x), not from our kernels' comments:
//   - mma.m16n8k16 with .f16/.bf16 inputs: section 9.7.14.5.8, "Matrix Fragments for mma.m16n8k16 with
//     floating point type" (figures "MMA .m16n8k16 fragment layout for matrix A / B / C/D").
//   - ldmatrix: section 9.7.14.5.15, "Warp-level matrix load instruction: ldmatrix" (figure
//     "ldmatrix fragment layout" and the table of which threads supply the row addresses).
//   - cp.async (runtime.cpp): "Data Movement and Conversion Instructions: cp.async" and its companions
//     cp.async.commit_group, cp.async.wait_group and cp.async.wait_all (the asynchronous-copy
//     subsection of 9.7.9): src-size bytes are copied and the rest of cp-size zero-filled; a copy is
//     complete only once a wait_group covers its group (wait_all = commit_group + wait_group 0).
// The tensor-core accumulation order and rounding are not specified by the ISA: the emulator adds
// the 16 exact products and C in double and rounds once to fp32 (at least as accurate as the hardware).
#include <cstdint>
#include <cstring>
#include <sstream>

#include "common/ptx.cuh"
#include "emu/emu.h"

namespace pyllmops {
namespace emu {

namespace {

float half_bits_to_float(uint16_t h, MmaType t) {
  if (t == MmaType::bf16) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half_raw raw;
  raw.x = h;
  return __half2float(__half(raw));
}

// Element e (0 = low 16 bits, 1 = high) of a .f16x2 / .bf16x2 register.
float elem(uint32_t reg, int e, MmaType t) { return half_bits_to_float(static_cast<uint16_t>(reg >> (16 * e)), t); }

struct MmaPayload {
  float* c;  // in: C, out: D (this lane's 4 accumulators)
  const uint32_t* a;
  uint32_t b[2];
  MmaType type;
};

// §9.7.14.5.8, with groupID = %laneid >> 2 and threadID_in_group = %laneid % 4:
//   A (16x16, .row): a_i for i in 0..7 sits in register i/2, half i%2;
//     row = groupID for a0,a1,a4,a5 and groupID + 8 for a2,a3,a6,a7;
//     col = threadID_in_group * 2 + (i & 1) for a0..a3 and + 8 for a4..a7.
//   B (16x8, .col): b_i for i in 0..3 sits in register i/2, half i%2;
//     row (k) = threadID_in_group * 2 + (i & 1) for b0,b1 and + 8 for b2,b3; col (n) = groupID.
//   C, D (16x8, fp32): c_i for i in 0..3; row = groupID for c0,c1 and groupID + 8 for c2,c3;
//     col = threadID_in_group * 2 + (i & 1).
void mma_combine(void* const* payloads, unsigned /*mask*/, const void* /*ctx*/) {
  float A[16][16], B[16][8], C[16][8];
  const MmaType type = static_cast<MmaPayload*>(payloads[0])->type;
  const bool broken_layout = (broken() & kBreakMma) != 0u;
  for (int lane = 0; lane < 32; ++lane) {
    const auto* p = static_cast<const MmaPayload*>(payloads[lane]);
    if (p->type != type) throw std::runtime_error("mma.sync: lanes disagree on the input type");
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 8; ++i) {
      const int row = g + ((i & 2) ? 8 : 0), col = t * 2 + (i & 1) + ((i & 4) ? 8 : 0);
      A[row][col] = elem(p->a[i / 2], i % 2, type);
    }
    for (int i = 0; i < 4; ++i) {
      const int k = t * 2 + (i & 1) + ((i & 2) ? 8 : 0);
      B[k][g] = elem(p->b[i / 2], i % 2, type);
    }
    for (int i = 0; i < 4; ++i) C[g + ((i & 2) ? 8 : 0)][t * 2 + (i & 1)] = p->c[i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    auto* p = static_cast<MmaPayload*>(payloads[lane]);
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      int row = g + ((i & 2) ? 8 : 0);
      const int col = t * 2 + (i & 1);
      if (broken_layout) row ^= 8;  // negative control: the row halves of D swapped
      double acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row][k]) * static_cast<double>(B[k][col]);
      p->c[i] = static_cast<float>(acc);
    }
  }
}

struct LdmatrixPayload {
  const void* row;
  uint32_t* r;
  int num;
  bool trans;
};

uint16_t load_b16(const void* row, int col) {
  uint16_t v;
  std::memcpy(&v, static_cast<const char*>(row) + 2 * col, 2);
  return v;
}

// §9.7.14.5.15: for .x1 threads 0-7 supply the addresses of the 8 rows of matrix 0, .x2 threads 0-15
// (matrices 0 and 1), .x4 threads 0-31 (matrices 0-3); each row is 8 contiguous 16-bit elements, its
// address 16-byte aligned. Destination register i holds a fragment of matrix i: thread l gets row l/4,
// elements 2(l%4) and 2(l%4)+1 (low half first). With .trans the matrix is read column-major: thread
// l gets column l/4, rows 2(l%4) and 2(l%4)+1.
void ldmatrix_combine(void* const* payloads, unsigned /*mask*/, const void* /*ctx*/) {
  const auto* p0 = static_cast<const LdmatrixPayload*>(payloads[0]);
  const int num = p0->num;
  const bool trans = p0->trans != ((broken() & kBreakLdmatrix) != 0u);  // negative control: wrong orientation
  const void* rows[32];
  for (int lane = 0; lane < 32; ++lane) {
    const auto* p = static_cast<const LdmatrixPayload*>(payloads[lane]);
    if (p->num != num || p->trans != p0->trans)
      throw std::runtime_error("ldmatrix: lanes of one warp execute different ldmatrix shapes");
    rows[lane] = p->row;
  }
  for (int lane = 0; lane < 8 * num; ++lane) {
    const auto addr = reinterpret_cast<uintptr_t>(rows[lane]);
    if (addr % 16 != 0 || !in_shared(rows[lane], 16)) {
      std::ostringstream os;
      os << "ldmatrix: lane " << lane << " supplies row address 0x" << std::hex << addr
         << (addr % 16 ? ", which is not 16-byte aligned" : ", which is not in the block's shared memory");
      throw std::runtime_error(os.str());
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    auto* p = static_cast<LdmatrixPayload*>(payloads[lane]);
    const int q = lane >> 2, t = lane & 3;
    for (int m = 0; m < num; ++m) {
      const void* const* mat = rows + 8 * m;
      uint16_t lo, hi;
      if (!trans) {
        lo = load_b16(mat[q], 2 * t);
        hi = load_b16(mat[q], 2 * t + 1);
      } else {
        lo = load_b16(mat[2 * t], q);
        hi = load_b16(mat[2 * t + 1], q);
      }
      p->r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

}  // namespace

void mma_m16n8k16(MmaType type, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, Site site) {
  MmaPayload p{c, a, {b0, b1}, type};
  warp_collective(Collective::mma, 0xffffffffu, &p, &mma_combine, nullptr, site);
}

void ldmatrix(int num, bool trans, uint32_t* r, const void* smem_row, Site site) {
  LdmatrixPayload p{smem_row, r, num, trans};
  warp_collective(Collective::ldmatrix, 0xffffffffu, &p, &ldmatrix_combine, nullptr, site);
}

}  // namespace emu
}  // namespace pyllmops
