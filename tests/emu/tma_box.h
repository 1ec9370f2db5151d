// The element order of a TMA tile copy of 16-bit elements, as the PTX ISA defines it: the box's elements fill
// shared memory in order, dimension 0 innermost; an element whose coordinate leaves the tensor in any dimension
// is zero. Shared by the emulator's copies (async.h) and tests/tma_layout_check.cu. Plain C++17.
#pragma once

#include <cstdint>

// Calls f(byte offset of the element from the tensor's base, or -1 for a zero) once per box element, in
// shared-memory order. strides: of dimensions 1-4, in bytes (dimension 0 is contiguous).
template <typename F>
void for_each_box_element(const uint64_t (&dims)[5], const uint64_t (&strides)[4], const uint32_t (&box)[5],
                          const int64_t (&coord)[5], F&& f) {
  for (uint32_t i4 = 0; i4 < box[4]; ++i4)
    for (uint32_t i3 = 0; i3 < box[3]; ++i3)
      for (uint32_t i2 = 0; i2 < box[2]; ++i2)
        for (uint32_t i1 = 0; i1 < box[1]; ++i1)
          for (uint32_t i0 = 0; i0 < box[0]; ++i0) {
            const uint32_t idx[5] = {i0, i1, i2, i3, i4};
            bool inside = true;
            int64_t byte = 0;
            for (int k = 0; k < 5; ++k) {
              const int64_t c = coord[k] + idx[k];
              inside = inside && c >= 0 && c < static_cast<int64_t>(dims[k]);
              byte += c * (k == 0 ? 2 : static_cast<int64_t>(strides[k - 1]));
            }
            f(inside ? byte : -1);
          }
}
