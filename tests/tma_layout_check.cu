// Host-only check (no GPU) that the Hopper attention's TMA tensor maps land tiles in the shared-memory layout
// its main loop reads (attn::core_offset), for SD's head dims, strided views, tails and padding. It replays each
// box copy as the PTX ISA defines it (tests/emu/tma_box.h, which the host emulator's copies use too).
// tests/test_build.py compiles and runs it; it prints "OK" and exits 0, or names the first wrong element.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../csrc/cuda/attention_sm90_mainloop.cuh"
#include "../csrc/cuda/tensor_map.h"
#include "emu/tma_box.h"

using sdcore::cuda::HeadTileMapLayout;
using sdcore::cuda::head_tile_map_layout;
using sdcore::cuda::attn::core_offset;

namespace {

struct Case {
  const char* name;
  int64_t batch, heads, rows, d, sb, sh, srow;  // strides in elements
  int box_rows, box_cols;
};

const void* kBase = reinterpret_cast<const void*>(uintptr_t(1) << 20);  // a 16-byte aligned address

// The source element index each shared-memory element of the box at (row0, head, batch) receives (-1: zero).
std::vector<int64_t> replay(const HeadTileMapLayout& l, int64_t row0, int64_t h, int64_t b) {
  const int64_t coord[5] = {0, row0, 0, h, b};
  std::vector<int64_t> smem;
  for_each_box_element(l.dims, l.strides, l.box, coord,
                       [&](int64_t byte) { smem.push_back(byte < 0 ? -1 : byte / 2); });
  return smem;
}

bool check(const Case& c) {
  HeadTileMapLayout l;
  if (!head_tile_map_layout(&l, kBase, c.batch, c.heads, c.rows, c.d, c.sb, c.sh, c.srow, c.box_rows, c.box_cols)) {
    std::printf("%s: layout refused\n", c.name);
    return false;
  }
  const int64_t last_box = (c.rows - 1) / c.box_rows * c.box_rows;
  for (int64_t row0 : {int64_t(0), last_box}) {
    for (int64_t h : {int64_t(0), c.heads - 1}) {
      for (int64_t b : {int64_t(0), c.batch - 1}) {
        const std::vector<int64_t> smem = replay(l, row0, h, b);
        if (smem.size() != size_t(c.box_rows) * c.box_cols) {
          std::printf("%s: the box holds %zu elements, the tile %d\n", c.name, smem.size(), c.box_rows * c.box_cols);
          return false;
        }
        for (int r = 0; r < c.box_rows; ++r) {
          for (int col = 0; col < c.box_cols; ++col) {
            const int64_t row = row0 + r;
            const int64_t want = row < c.rows && col < c.d ? b * c.sb + h * c.sh + row * c.srow + col : -1;
            const int64_t at = core_offset(r, col / 8, c.box_rows) / 2 + col % 8;
            if (smem[at] != want) {
              std::printf("%s: box (row0 %lld, head %lld, batch %lld), tile row %d column %d: element %lld, "
                          "want %lld\n", c.name, (long long)row0, (long long)h, (long long)b, r, col,
                          (long long)smem[at], (long long)want);
              return false;
            }
          }
        }
      }
    }
  }
  return true;
}

}  // namespace

int main() {
  const int64_t n = 333, h = 8;
  const Case cases[] = {
      // [B, H, N, D] contiguous, SD 1.x's D = 40 padded to 48 (the sixth chunk is zeros), a 130-row tail.
      {"contiguous d40", 2, 3, 130, 40, 3 * 130 * 40, 130 * 40, 40, 64, 48},
      // q/k/v as views of one [B, N, 3, H, D] projection (the UNet's fused q/k/v), Q's 128-row box.
      {"fused qkv d40", 2, h, n, 40, n * 3 * h * 40, 40, 3 * h * 40, 128, 48},
      {"fused kv d64", 2, 5, 77, 64, 77 * 2 * 5 * 64, 64, 2 * 5 * 64, 64, 64},
      {"contiguous d80", 1, 2, 1000, 80, 2 * 1000 * 80, 1000 * 80, 80, 128, 80},
      {"contiguous d160", 2, 2, 97, 160, 2 * 97 * 160, 97 * 160, 160, 64, 160},
      // Extent-1 batch and head dims with strides torch may leave arbitrary (not multiples of 8).
      {"one head, odd strides", 1, 1, 70, 64, 3, 5, 64, 64, 64},
  };
  int failed = 0;
  for (const Case& c : cases) failed += check(c) ? 0 : 1;

  // Layouts no tensor map may describe, so the kernel falls back to cp.async: a zero head stride (K/V expanded
  // over heads), a row stride that is not a multiple of 16 bytes, d % 8 != 0, an unaligned base, a box wider
  // than 256 rows.
  HeadTileMapLayout l;
  struct Bad {
    const char* name;
    const void* base;
    int64_t heads, d, sh, srow;
    int box_rows;
  };
  const Bad bad[] = {{"zero head stride", kBase, 4, 64, 0, 64, 64},
                     {"row stride 12", kBase, 1, 8, 96, 12, 64},
                     {"d 44", kBase, 1, 44, 44 * 64, 44, 64},
                     {"unaligned base", reinterpret_cast<const void*>(uintptr_t(1) << 20 | 8), 1, 64, 4096, 64, 64},
                     {"box of 512 rows", kBase, 1, 64, 4096, 64, 512}};
  for (const Bad& x : bad) {
    if (head_tile_map_layout(&l, x.base, 1, x.heads, 64, x.d, 1 << 20, x.sh, x.srow, x.box_rows, 64)) {
      std::printf("%s: accepted\n", x.name);
      ++failed;
    }
  }
  if (failed == 0) {
    std::printf("OK: %zu layouts, %zu refusals\n", sizeof(cases) / sizeof(cases[0]), sizeof(bad) / sizeof(bad[0]));
  }
  return failed == 0 ? 0 : 1;
}
