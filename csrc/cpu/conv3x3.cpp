// 3x3 convolution (stride 1, padding 1: every 3x3 convolution of the SD UNet and VAE but the downsamplers') on
// the CPU by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional
// Neural Networks", 2016). Each 2x2 block of outputs (a tile) comes from the 4x4 input patch around it: with
// V = B^T d B per patch and U = G g G^T per filter, the 16 positions xi of the transformed tile are 16
// independent GEMMs M_xi = U_xi V_xi over the input channels, and Y = A^T M A. That is 16 multiplies per 4
// outputs and input channel where the direct convolution does 36, so the GEMMs do 2.25x fewer FLOPs than
// oneDNN's direct convolution, at MKL's GEMM rate.
//
// The transforms add and subtract only (G's 1/2 is exact), and U is computed in double: the extra error is
// the output transform's sum of up to 9 GEMM results. The GEMMs run over blocks of 128 input channels
// (sgemm_blocked_k), so that each result's rounding does not depend on one BLAS kernel's k loop: with MKL's
// single-call GEMMs the error reached 2.15x PyTorch's on an Intel Xeon and 1.0-1.8x on AMD EPYCs. Against a
// float64 convolution its RMS error is 0.84-1.51x that of PyTorch's float32 one on that Xeon, on the SD shapes
// sdcore.ops.conv3x3 sends here (tests/test_conv3x3.py holds those to <= 2x), and up to ~3x on 4x4 images of
// 1280 channels, which it sends to one GEMM over the 3x3 patches instead (the direct convolution's
// arithmetic, and faster there too).
// F(4x4, 3x3) would cut the FLOPs 4x, but its transforms (2, 4, 5, 8) multiply the error, so it is not used.
//
// Work goes in chunks of whole tile rows, sized so the transformed input V [16][C][T] and the GEMM results
// M [16][Co][T] of a chunk stay near the L3 cache: per chunk, the input transform (tasks over channel x row),
// the 16 GEMMs (each a one-thread MKL call), and the output transform (tasks over output channel x row) with the
// bias. The GEMMs read U one of two ways: transformed up front for every filter and streamed from memory (tasks
// over xi x output-channel block), or, with few tiles, transformed per block of output channels in the task that
// runs that block's 16 GEMMs, so it stays in cache (kFusedMaxTiles).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "../common/checks.h"
#include "blas.h"
#include "vec.h"

namespace sdcore {
namespace cpu {
namespace {

// U[xi][co - co_begin][ci] (xi's plane `plane` floats apart) for the filters of output channels [co_begin, co_end),
// by winograd_filters per block of input channels.
void transform_filters(const float* w, int64_t co_begin, int64_t co_end, int64_t ci_count, float* u, int64_t plane,
                       bool streaming) {
  constexpr int64_t kBlock = 64;
  for (int64_t co = co_begin; co < co_end; ++co) {
    for (int64_t ci0 = 0; ci0 < ci_count; ci0 += kBlock) {
      winograd_filters(w + (co * ci_count + ci0) * 9, std::min(kBlock, ci_count - ci0),
                       u + (co - co_begin) * ci_count + ci0, plane, streaming);
    }
  }
}

// U, V and M live in one buffer that is kept between calls: allocated afresh, the 100+ MB of a 1280-channel
// layer's U cost more in first-touch page faults (the kernel zeroing every 4 KiB page) than the GEMMs saved.
// Idle buffers wait in a pool, one per concurrent call at most, so calls from several threads each get their
// own; the pool keeps what the largest layer needed, freed when the process ends.
class Workspace {
 public:
  explicit Workspace(int64_t floats) {
    floats += kAlign;  // room to align data()
    {
      std::lock_guard<std::mutex> lock(mutex());
      auto& idle = pool();
      if (!idle.empty()) {
        // The smallest idle buffer that fits, else the largest one (grown below).
        auto fit = idle.end(), largest = idle.begin();
        for (auto it = idle.begin(); it != idle.end(); ++it) {
          if (static_cast<int64_t>(it->size()) >= floats && (fit == idle.end() || it->size() < fit->size())) fit = it;
          if (it->size() > largest->size()) largest = it;
        }
        const auto best = fit != idle.end() ? fit : largest;
        buffer_ = std::move(*best);
        idle.erase(best);
      }
    }
    if (static_cast<int64_t>(buffer_.size()) < floats) {
      buffer_ = Buffer();  // free the small one before allocating the large one
      buffer_.resize(floats);
    }
  }
  ~Workspace() {
    std::lock_guard<std::mutex> lock(mutex());
    pool().push_back(std::move(buffer_));
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  // 64-byte aligned, so U's planes take whole-line streaming stores.
  float* data() {
    return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buffer_.data()) + 63) & ~uintptr_t{63});
  }

 private:
  static constexpr int64_t kAlign = 64 / sizeof(float);
  // Default-initialized floats: resize leaves them unwritten (every use writes before it reads).
  struct NoInit {
    float value;
    NoInit() {}
  };
  static_assert(sizeof(NoInit) == sizeof(float));
  struct Buffer : std::vector<NoInit> {
    float* data() { return reinterpret_cast<float*>(std::vector<NoInit>::data()); }
  };
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::vector<Buffer>& pool() {
    static std::vector<Buffer> p;
    return p;
  }
  Buffer buffer_;
};

// A chunk holds at least kMinChunkTiles tiles, so each pass over U (streamed from memory for the 1280-channel
// layers) feeds GEMMs of at least that many rows, and otherwise as many whole tile rows as keep its V and M
// within kChunkBytes, about half the L3 of the machines this was tuned on (bench/ops.py --ops conv3x3; 8 and
// 32 MiB, 256 and 1024 tiles measured the same within this VM's noise).
constexpr int64_t kChunkBytes = int64_t{16} << 20;
constexpr int64_t kMinChunkTiles = 512;
// The most tiles the fused path below takes: measured against the streamed one (bench/ops.py --ops conv3x3 and
// A/B runs), it wins up to 64 tiles (1.03-1.5x), is mixed at 128 (0.82x with 1280 channels, 1.0-1.17x with 320-960)
// and loses from 256 (0.79-0.91x).
constexpr int64_t kFusedMaxTiles = 64;

at::Tensor conv3x3_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  Conv3x3Call c = prepare_conv3x3(x, weight, bias);
  at::Tensor& out = c.out;
  const int64_t B = c.x.size(0), C = c.x.size(1), H = c.x.size(2), W = c.x.size(3), Co = c.weight.size(0);
  if (out.numel() == 0) return out;
  if (C == 0) return c.bias.defined() ? out.copy_(c.bias.view({1, Co, 1, 1}).expand_as(out)) : out.zero_();

  const float* xp = c.x.data_ptr<float>();
  const float* bp = c.bias.defined() ? c.bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();

  const int64_t th = (H + 1) / 2, tw = (W + 1) / 2, rows_total = B * th;
  const int64_t row_bytes = 16 * (C + Co) * tw * static_cast<int64_t>(sizeof(float));
  const int64_t threads = at::get_num_threads();
  int64_t chunk_rows =
      std::clamp<int64_t>(std::max(kChunkBytes / row_bytes, (kMinChunkTiles + tw - 1) / tw), 1, rows_total);
  const int64_t chunks = (rows_total + chunk_rows - 1) / chunk_rows;
  chunk_rows = (rows_total + chunks - 1) / chunks;  // equal chunks
  const int64_t max_tiles = chunk_rows * tw;
  // Few tiles in one chunk (the 8x8 and smaller levels): each task transforms the filters of fused_co output
  // channels into its own U block, which stays in cache, and runs their 16 GEMMs at once, so U never goes to
  // memory and back. More tiles and the GEMMs' re-reads of V (per block) cost more than that round trip.
  const bool fused = chunks == 1 && max_tiles <= kFusedMaxTiles;
  const int64_t fused_co = std::min(Co, std::clamp<int64_t>((Co + 2 * threads - 1) / (2 * threads), 8, 32));
  const int64_t u_floats = fused ? threads * 16 * fused_co * C : 16 * Co * C;
  Workspace ws(u_floats + 16 * (C + Co) * max_tiles);
  float* up = ws.data();
  float* vp = up + u_floats;
  float* mp = vp + 16 * C * max_tiles;
  const float* wp = c.weight.data_ptr<float>();
  if (!fused) {
    // All of U up front, by streaming stores: it is larger than the cache for the wide layers.
    at::parallel_for(0, Co, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
      transform_filters(wp, begin, end, C, up + begin * C, Co * C, /*streaming=*/true);
      store_fence();  // before the pool's barrier lets the GEMMs read U
    });
  }
  const std::vector<float> zeros(W, 0.0f);

  for (int64_t r0 = 0; r0 < rows_total; r0 += chunk_rows) {
    const int64_t nr = std::min(chunk_rows, rows_total - r0), tiles = nr * tw;
    const int64_t grain_in = std::max<int64_t>(1, 4096 / std::max<int64_t>(W, 1));
    at::parallel_for(0, C * nr, grain_in, [&](int64_t begin, int64_t end) {
      std::vector<float> s(4 * (2 * tw + 2));
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t ci = idx / nr, rr = idx % nr, row = r0 + rr, b = row / th, ty = row % th;
        const float* plane = xp + (b * C + ci) * H * W;
        const float* rows[4];
        for (int k = 0; k < 4; ++k) {
          const int64_t y = 2 * ty - 1 + k;
          rows[k] = (y >= 0 && y < H) ? plane + y * W : zeros.data();
        }
        winograd_input_row(rows, W, tw, s.data(), vp + ci * tiles + rr * tw, C * tiles);
      }
    });
    if (fused) {
      at::parallel_for(0, (Co + fused_co - 1) / fused_co, 1, [&](int64_t begin, int64_t end) {
        const int64_t thread = at::get_thread_num();
        TORCH_CHECK(thread < threads, "sdcore.conv3x3: thread ", thread, " of ", threads);
        float* ub = up + thread * 16 * fused_co * C;
        for (int64_t block = begin; block < end; ++block) {
          const int64_t co0 = block * fused_co, n = std::min(fused_co, Co - co0);
          transform_filters(wp, co0, co0 + n, C, ub, n * C, /*streaming=*/false);
          for (int64_t xi = 0; xi < 16; ++xi) {
            sgemm_blocked_k(tiles, n, C, vp + xi * C * tiles, tiles, ub + xi * n * C, C, mp + (xi * Co + co0) * tiles,
                            tiles);
          }
        }
      });
    } else {
      // Output-channel blocks per xi so that the GEMM tasks outnumber the threads at least twice.
      const int64_t co_blocks = std::min<int64_t>(Co, std::max<int64_t>(1, (2 * threads + 15) / 16));
      const int64_t co_block = (Co + co_blocks - 1) / co_blocks;
      at::parallel_for(0, 16 * co_blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t xi = task / co_blocks, co0 = (task % co_blocks) * co_block;
          const int64_t n = std::min(co_block, Co - co0);
          if (n <= 0) continue;
          // Column-major: M_xi^T [tiles x n] = V_xi^T [tiles x C] * U_xi^T [C x n].
          sgemm_blocked_k(tiles, n, C, vp + xi * C * tiles, tiles, up + (xi * Co + co0) * C, C,
                          mp + (xi * Co + co0) * tiles, tiles);
        }
      });
    }
    at::parallel_for(0, Co * nr, grain_in, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t co = idx / nr, rr = idx % nr, row = r0 + rr, b = row / th, ty = row % th;
        float* out0 = op + ((b * Co + co) * H + 2 * ty) * W;
        float* out1 = 2 * ty + 1 < H ? out0 + W : nullptr;
        winograd_output_row(mp + co * tiles + rr * tw, Co * tiles, tw, W, bp ? bp[co] : 0.0f, out0, out1);
      }
    });
  }
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace sdcore

TORCH_LIBRARY_IMPL(sdcore, CPU, m) { m.impl("conv3x3", &sdcore::cpu::conv3x3_cpu); }
