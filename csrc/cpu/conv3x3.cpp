// 3x3 convolution (stride 1, padding 1: every 3x3 convolution of the SD UNet and VAE but the downsamplers') on
// the CPU by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional
// Neural Networks", 2016). Each 2x2 block of outputs (a tile) comes from the 4x4 input patch around it: with
// V = B^T d B per patch and U = G g G^T per filter, the 16 positions xi of the transformed tile are 16
// independent GEMMs M_xi = U_xi V_xi over the input channels, and Y = A^T M A. That is 16 multiplies per 4
// outputs and input channel where the direct convolution does 36, so the GEMMs do 2.25x fewer FLOPs than
// oneDNN's direct convolution, at MKL's GEMM rate.
//
// The transforms add and subtract only (G's 1/2 is exact), and U is computed in double: the extra error is
// the output transform's sum of up to 9 GEMM results. Against a float64 convolution its RMS error is 1.0-1.8x
// that of PyTorch's float32 one on the SD shapes sdcore.ops.conv3x3 sends here (tests/test_conv3x3.py holds
// those to <= 2x), and up to ~3x on 4x4 images of 1280 channels, which it sends to oneDNN (slower here too).
// F(4x4, 3x3) would cut the FLOPs 4x, but its transforms (2, 4, 5, 8) multiply the error, so it is not used.
//
// Work goes in chunks of whole tile rows, sized so the transformed input V [16][C][T] and the GEMM results
// M [16][Co][T] of a chunk stay near the L3 cache: per chunk, the input transform (tasks over channel x row),
// the 16 GEMMs (tasks over xi x output-channel block, each a one-thread MKL call), and the output transform
// (tasks over output channel x row) with the bias.
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

// U[xi][co][ci] for every filter (winograd_filters, per block of input channels), in tasks over output channels.
void transform_filters(const float* w, int64_t co_count, int64_t ci_count, float* u) {
  constexpr int64_t kBlock = 64;
  const int64_t plane = co_count * ci_count;
  at::parallel_for(0, co_count, std::max<int64_t>(1, 4096 / std::max<int64_t>(ci_count, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t co = begin; co < end; ++co) {
      for (int64_t ci0 = 0; ci0 < ci_count; ci0 += kBlock) {
        winograd_filters(w + (co * ci_count + ci0) * 9, std::min(kBlock, ci_count - ci0),
                         u + co * ci_count + ci0, plane);
      }
    }
    store_fence();  // before the pool's barrier lets the GEMMs read U
  });
}

// U, V and M live in one buffer that is kept between calls: allocated afresh, the 100+ MB of a 1280-channel
// layer's U cost more in first-touch page faults (the kernel zeroing every 4 KiB page) than the GEMMs saved.
// Idle buffers wait in a pool, one per concurrent call at most, so calls from several threads each get their
// own; the pool keeps what the largest layer needed, freed when the process ends.
class Workspace {
 public:
  explicit Workspace(int64_t floats) {
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
  float* data() { return buffer_.data(); }

 private:
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
  Workspace ws(16 * (Co * C + (C + Co) * max_tiles));
  float* up = ws.data();
  float* vp = up + 16 * Co * C;
  float* mp = vp + 16 * C * max_tiles;
  transform_filters(c.weight.data_ptr<float>(), Co, C, up);
  const std::vector<float> zeros(W, 0.0f);

  // Output-channel blocks per xi so that the GEMM tasks outnumber the threads at least twice.
  const int64_t co_blocks = std::min<int64_t>(Co, std::max<int64_t>(1, (2 * threads + 15) / 16));
  const int64_t co_block = (Co + co_blocks - 1) / co_blocks;

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
    at::parallel_for(0, 16 * co_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t xi = task / co_blocks, co0 = (task % co_blocks) * co_block;
        const int64_t n = std::min(co_block, Co - co0);
        if (n <= 0) continue;
        // Column-major: M_xi^T [tiles x n] = V_xi^T [tiles x C] * U_xi^T [C x n].
        sgemm(false, false, tiles, n, C, 1.0f, vp + xi * C * tiles, tiles, up + (xi * Co + co0) * C, C, 0.0f,
              mp + (xi * Co + co0) * tiles, tiles);
      }
    });
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
