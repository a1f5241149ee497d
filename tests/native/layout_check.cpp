// The NCHW -> NHWC copy kernels (csrc/cuda/layout.cuh: the tile kernel for C >= 16, the small
// kernel below) run on the CPU under the CUDA emulation (cuda_emulation.h) over random shapes
// (channels and pixels spanning partial tiles, grids smaller than the work so that the
// grid-stride loops turn), for 2-, 4- and 8-byte words and 32- and 64-bit indices, against the
// permutation written out.
// Prints the checks and "0 fails" when everything matched (tests/test_native.py).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda_emulation.h"
#include "cuda/layout.cuh"

using namespace convrnn::layout;

namespace {

std::mt19937 rng(1);
int rnd(int a, int b) { return std::uniform_int_distribution<int>(a, b)(rng); }
int checks = 0, fails = 0;

template <typename U, typename I>
void check_one(int N, int C, int H, int W) {
  const int64_t HW = int64_t(H) * W, total = N * C * HW;
  std::vector<U> src(total), dst(total, U(0x5A5A));
  for (int64_t i = 0; i < total; ++i) src[i] = static_cast<U>(i * 2654435761u + 7);
  if (C < kSmallC) {
    const int64_t blocks = rnd(1, 3);
    emu::launch_blocks_in_turn(nchw_to_nhwc_small_kernel<U, I>, blocks, rnd(1, 2) * 32,
                               static_cast<const U*>(src.data()), dst.data(), I(C), I(HW), I(N * HW));
  } else {
    const int64_t tiles = N * ((C + kTile - 1) / kTile) * ((HW + kTile - 1) / kTile);
    const int64_t blocks = std::min<int64_t>(tiles, rnd(1, 4));
    emu::launch_blocks_in_turn(nchw_to_nhwc_tile_kernel<U, I>, blocks, kTile * kTileRows,
                               static_cast<const U*>(src.data()), dst.data(), I(C), I(HW), I(tiles));
  }
  ++checks;
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c)
      for (int64_t p = 0; p < HW; ++p)
        if (dst[(n * HW + p) * C + c] != src[(int64_t(n) * C + c) * HW + p]) {
          std::printf("FAIL %zu-byte/%zu-byte-index N%d C%d H%d W%d at n%d c%d p%lld\n", sizeof(U), sizeof(I), N, C, H, W, n, c,
                      static_cast<long long>(p));
          ++fails;
          return;
        }
}

}  // namespace

int main() {
  for (int it = 0; it < 24; ++it) {
    const int N = rnd(1, 3), C = it % 3 == 0 ? rnd(1, 15) : rnd(16, 70), H = rnd(1, 12), W = rnd(1, 12);
    check_one<uint16_t, int32_t>(N, C, H, W);  // both index types, as with_index_type picks them
    check_one<uint32_t, int64_t>(N, C, H, W);
    check_one<uint64_t, int32_t>(N, C, H, W);
  }
  std::printf("%d checks, %d fails\n", checks, fails);
  return fails != 0;
}
