// Host emulation of csrc/cuda/attention_ptx.cuh (the sm_80 warp-level primitives) for the SIMT emulator
// (simt.h): the same functions, with the semantics the PTX ISA gives them, run as warp collectives. The test
// copies the attention headers into a scratch tree with this file in place of the original.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "simt.h"

namespace sdcore {
namespace cuda {
namespace attn {

inline unsigned char* dyn_smem() { return emu::cur_block()->smem.data(); }

inline uint32_t smem_addr(const void* p) { return emu::smem_offset(p, 1, "shared address"); }

namespace detail {
// ldmatrix .x4: lane 8 i + j gives the address of row j of matrix i; lane l receives, of matrix i, row l / 4,
// columns 2 (l % 4) and + 1 (trans: column l / 4, rows 2 (l % 4) and + 1), the lower one in the low half.
inline void ldmatrix(uint32_t (&r)[4], const void* p, bool trans) {
  emu::Block& b = *emu::cur_block();
  const unsigned warp = emu::cur_thread()->tid / 32, lane = emu::cur_thread()->tid % 32, base = warp * 32;
  b.u32_in[0][base + lane] = emu::smem_offset(p, 16, "ldmatrix");
  if (b.u32_in[0][base + lane] % 16 != 0) emu::fail("ldmatrix row address not 16-byte aligned");
  emu::rendezvous(b.warp_rv[warp], 32, trans ? "ldmatrix.trans" : "ldmatrix", [&] {
    for (unsigned l = 0; l < 32; ++l) {
      for (unsigned i = 0; i < 4; ++i) {
        uint16_t h[2];
        for (unsigned e = 0; e < 2; ++e) {
          const unsigned row = trans ? 2 * (l % 4) + e : l / 4, col = trans ? l / 4 : 2 * (l % 4) + e;
          std::memcpy(&h[e], b.smem.data() + b.u32_in[0][base + 8 * i + row] + 2 * col, 2);
        }
        b.u32_out[i][base + l] = uint32_t(h[0]) | (uint32_t(h[1]) << 16);
      }
    }
  });
  for (unsigned i = 0; i < 4; ++i) r[i] = b.u32_out[i][base + lane];
}

inline float half_of(uint32_t reg, unsigned e, bool bf16) {
  return emu::bits_to_float(static_cast<uint16_t>(reg >> (16 * e)), bf16);
}
}  // namespace detail

inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { detail::ldmatrix(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { detail::ldmatrix(r, p, true); }

// mma.m16n8k16.row.col: lane l = 4 g + tg; A: a[hi + 2 kh] = row g + 8 hi, columns 8 kh + 2 tg (+1);
// B: b[kh] = column g, rows 8 kh + 2 tg (+1); C/D: c[2 hi + e] = row g + 8 hi, column 2 tg + e.
template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  emu::Block& b = *emu::cur_block();
  const unsigned warp = emu::cur_thread()->tid / 32, lane = emu::cur_thread()->tid % 32, base = warp * 32;
  for (int i = 0; i < 4; ++i) b.u32_in[i][base + lane] = a[i], b.f32_in[i][base + lane] = c[i];
  b.u32_in[4][base + lane] = b0;
  b.u32_in[5][base + lane] = b1;
  emu::rendezvous(b.warp_rv[warp], 32, "mma.sync.m16n8k16", [&] {
    for (unsigned row = 0; row < 16; ++row) {
      for (unsigned n = 0; n < 8; ++n) {
        float acc = 0.0f;
        for (unsigned k = 0; k < 16; ++k) {
          const float x = detail::half_of(b.u32_in[(row / 8) + 2 * (k / 8)][base + 4 * (row % 8) + (k % 8) / 2],
                                          k % 2, kBf16);
          const float y = detail::half_of(b.u32_in[4 + k / 8][base + 4 * n + (k % 8) / 2], k % 2, kBf16);
          acc += x * y;
        }
        const unsigned l = 4 * (row % 8) + n / 2, reg = 2 * (row / 8) + n % 2;
        b.f32_out[reg][base + l] = b.f32_in[reg][base + l] + acc;
      }
    }
  });
  for (int i = 0; i < 4; ++i) c[i] = b.f32_out[i][base + lane];
}

inline void cp_async_16(void* dst, const void* src, int src_bytes) { emu::cp_async_16(dst, src, src_bytes); }
inline void cp_async_commit() { emu::cp_async_commit(); }
inline void cp_async_wait_all() { emu::cp_async_wait(0); }
template <int N>
inline void cp_async_wait() {
  emu::cp_async_wait(N);
}

template <typename T>
inline uint32_t pack2(float lo, float hi) {
  uint16_t l, h;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    l = __float2bfloat16_rn(lo).x, h = __float2bfloat16_rn(hi).x;
  } else {
    l = __float2half_rn(lo).x, h = __float2half_rn(hi).x;
  }
  return uint32_t(l) | (uint32_t(h) << 16);
}

}  // namespace attn
}  // namespace cuda
}  // namespace sdcore
