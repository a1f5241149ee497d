// conv2d CUDA: the index arithmetic of the implicit-GEMM kernels, host-device and free of
// ATen so that a CPU program can test it against the definition of convolution.
//
// Every GEMM kernel here views a convolution as C[m][n] = sum_kr A[m][kr] * B[kr][n], per
// group, with the image operand gathered on the fly:
//
//  forward        m = output pixel (n, p, q), kr = (r, s, c) with c fastest, n = output channel k;
//                 A = input (NHWC) at (p*sh - ph + r*dh, q*sw - pw + s*dw), B = repacked weight.
//  backward data  m = input pixel (n, h, w) of one stride phase (h % sh, w % sw), kr = (r, s, k)
//                 over the taps that reach that phase only, n = input channel c;
//                 A = grad_output (NHWC) at p = (h + ph - r*dh) / sh, B = repacked weight.
//  backward weight (a different kernel) m = k, n = (r, s, c), kr = output pixel, split in chunks.
//
// Forward and backward data are one kernel: along each image axis an AxisPlan says which
// filter taps take part (tap0, tap0 + tap_step, ...), where the source row of GEMM row i and
// tap t is (i*src_mul + src_base + t*src_tap), and where GEMM row i lands in the destination
// (i*dst_mul + dst_base).  Forward: the taps are all of them and the destination is the
// output.  Backward data: input rows h = a + sh*i of phase a meet filter taps r with
// (a + ph - r*dh) % sh == 0, i.e. r = r0, r0 + sh/gcd(sh, dh), ...; each of them reads
// grad_output row p = i + (a + ph - r0*dh)/sh - t*(tap_step*dh/sh).  No tap is wasted on
// strides: every (r, s) a block loops over contributes (up to the image border).
#pragma once

#include <cstdint>

#ifndef CONVRNN_HD
#if defined(__CUDACC__)
#define CONVRNN_HD __host__ __device__ __forceinline__
#else
#define CONVRNN_HD inline
#endif
#endif

namespace convrnn {
namespace conv {

struct AxisPlan {
  int taps;       // filter taps taking part along this axis (0: the phase gets no gradient)
  int tap0;       // first filter tap
  int tap_step;   // filter tap of the t-th taking part = tap0 + t*tap_step
  int src_len;    // source extent (input for the forward, grad_output for backward data)
  int src_mul, src_base, src_tap;  // source row of GEMM row i, tap t = i*src_mul + src_base + t*src_tap
  int len;        // GEMM rows along this axis (output size, or the phase's share of the input)
  int dst_mul, dst_base;           // destination row of GEMM row i = i*dst_mul + dst_base
  int before;     // filter taps along this axis that belong to earlier phases (packing order)
};

// The stride phase (input row modulo the stride) that filter tap r reaches: input rows
// h = o*s - p + r*d, so h % s == (r*d - p) mod s.
CONVRNN_HD int tap_phase(int r, int s, int p, int d) {
  const int m = (r * d - p) % s;
  return m < 0 ? m + s : m;
}

CONVRNN_HD int gcd_int(int a, int b) {
  while (b != 0) {
    const int t = a % b;
    a = b;
    b = t;
  }
  return a;
}

// Forward along one axis: input size `in`, k taps, stride s, padding p, dilation d, output size out.
CONVRNN_HD AxisPlan forward_axis(int in, int k, int s, int p, int d, int out) {
  AxisPlan a;
  a.taps = k;
  a.tap0 = 0;
  a.tap_step = 1;
  a.src_len = in;
  a.src_mul = s;
  a.src_base = -p;
  a.src_tap = d;
  a.len = out;
  a.dst_mul = 1;
  a.dst_base = 0;
  a.before = 0;
  return a;
}

// Backward data along one axis for phase `ph` in [0, s): the input rows h = ph + s*i.
CONVRNN_HD AxisPlan backward_data_axis(int in, int k, int s, int p, int d, int out, int phase) {
  AxisPlan a;
  a.src_len = out;
  a.src_mul = 1;
  a.dst_mul = s;
  a.dst_base = phase;
  a.len = phase < in ? (in - phase + s - 1) / s : 0;
  a.tap_step = s / gcd_int(s, d);
  a.before = 0;
  for (int r = 0; r < k; ++r) a.before += tap_phase(r, s, p, d) < phase ? 1 : 0;
  a.tap0 = k;  // none found yet
  const int search = k < a.tap_step ? k : a.tap_step;
  for (int r = 0; r < search; ++r) {
    if ((phase + p - r * d) % s == 0) {  // exact multiples (also negative ones) leave remainder 0
      a.tap0 = r;
      break;
    }
  }
  if (a.tap0 < k) {
    a.taps = (k - 1 - a.tap0) / a.tap_step + 1;
    a.src_base = (phase + p - a.tap0 * d) / s;  // exact
    a.src_tap = -(a.tap_step * d) / s;          // exact: tap_step*d = lcm(s, d)
  } else {
    a.taps = 0;
    a.tap0 = 0;
    a.src_base = 0;
    a.src_tap = 0;
  }
  return a;
}

// The plan of the block's phase: one phase (forward) or sh*sw of them (backward data).
CONVRNN_HD AxisPlan axis_plan(bool dgrad, int in, int k, int s, int p, int d, int out, int phase) {
  return dgrad ? backward_data_axis(in, k, s, p, d, out, phase) : forward_axis(in, k, s, p, d, out);
}

// The reduction index kr = (tr, ts, c), c fastest, of Cpg channels and ts_count column taps.
struct Tap {
  int tr, ts, c;
};

CONVRNN_HD Tap split_kr(int kr, int cpg, int ts_count) {
  Tap t;
  t.c = kr % cpg;
  const int rs = kr / cpg;
  t.ts = rs % ts_count;
  t.tr = rs / ts_count;
  return t;
}

// split_kr of kr, kr + step, kr + 2*step, ... without a division per step (a loader's kr
// advances by the block's BK per tile).  Any number of steps past the end is harmless.
struct TapCursor {
  Tap t;
  CONVRNN_HD void init(int kr, int cpg, int ts_count) { t = split_kr(kr, cpg, ts_count); }
  CONVRNN_HD void advance(int step, int cpg, int ts_count) {
    t.c += step;
    while (t.c >= cpg) {
      t.c -= cpg;
      if (++t.ts == ts_count) {
        t.ts = 0;
        ++t.tr;
      }
    }
  }
};

// The packed weight of the forward/backward-data GEMM is [rows][ld], one row per reduction
// index of every (phase, group), in the order the kernel reads them: phase (a, b) a-major,
// then group, then kr = (tr, ts, cc) of that phase.  A block's B operand is then the dense
// row range [phase_row0 + g*Kr, + Kr).  Forward: one phase holding every tap.
CONVRNN_HD int64_t phase_row0(const AxisPlan& ah, const AxisPlan& aw, int S, int groups, int cpg) {
  return (static_cast<int64_t>(ah.before) * S + static_cast<int64_t>(ah.taps) * aw.before) * groups * cpg;
}

// Packed row of filter tap (r, s), group g, reduction channel cc (input channel forward,
// output channel backward data).  in/k/st/pad/dil/out per axis as for axis_plan.
CONVRNN_HD int64_t packed_row(bool dgrad, int g, int r, int s, int cc, int groups, int cpg, int H, int R, int sh,
                              int ph, int dh, int P, int W, int S, int sw, int pw, int dw, int Q) {
  const AxisPlan ah = axis_plan(dgrad, H, R, sh, ph, dh, P, dgrad ? tap_phase(r, sh, ph, dh) : 0);
  const AxisPlan aw = axis_plan(dgrad, W, S, sw, pw, dw, Q, dgrad ? tap_phase(s, sw, pw, dw) : 0);
  const int tr = (r - ah.tap0) / ah.tap_step, ts = (s - aw.tap0) / aw.tap_step;
  const int64_t kr_count = static_cast<int64_t>(ah.taps) * aw.taps * cpg;
  return phase_row0(ah, aw, S, groups, cpg) + g * kr_count + (static_cast<int64_t>(tr) * aw.taps + ts) * cpg + cc;
}

// Split of a reduction over `pixels` into chunks, fixed by the shape alone (never by the
// device): enough chunks that outputs * chunks reaches `target` work items, each chunk at
// least `min_len` long and a multiple of `align`.  Chunk i covers [i*len, min((i+1)*len, pixels)).
struct Chunks {
  int64_t len;
  int count;
};

CONVRNN_HD Chunks split_chunks(int64_t pixels, int64_t outputs, int64_t target, int64_t min_len, int64_t align,
                               int max_count) {
  Chunks c;
  if (pixels <= 0) {
    c.len = align;
    c.count = 0;
    return c;
  }
  int64_t want = outputs > 0 ? (target + outputs - 1) / outputs : 1;
  const int64_t most = (pixels + min_len - 1) / min_len;
  if (want > most) want = most;
  if (want > max_count) want = max_count;
  if (want < 1) want = 1;
  int64_t len = (pixels + want - 1) / want;
  len = (len + align - 1) / align * align;
  c.len = len;
  c.count = static_cast<int>((pixels + len - 1) / len);
  return c;
}

// ---- the SIMT image GEMM's tile (float32 without TF32) ----
//
// A block of 256 threads computes a bm x bn tile of C, each thread a (bm/16) x (bn/16)
// register tile.  Every output element is one thread's sum over the same reduction order
// whatever the tile, so the choice changes the speed only, never a bit of the result.
// Candidates, in order of preference: for at most 16 columns 256x16, 128x16, 64x16; else bm
// 128 then 64, each with bn from the columns' tile (32, 64 or 128 covering them, capped at
// 128) down to 32.  A model of each, in arbitrary units:
//   per_sm = ceil(blocks / sms): the blocks the busiest SM runs;
//   eff    = the micro-kernel's shared-memory bound: per k step a warp issues tm*tn FMAs
//            (4 warp instructions a clock per SM) and loads tm + tn fragment values (tm + tn
//            clocks at 128 bytes a clock); eff = min(1, (tm*tn/4) / (tm + tn));
//   occ    = 0.5 when the busiest SM holds a single block (8 warps hide too little latency:
//            H200, CONV2 forward at 92 blocks of 128x128 on 132 SMs ran at ~1/3 of the SM's
//            FMA rate), else 1 (the launch bounds keep two blocks of any tile resident);
//   cost   = per_sm * bm * bn / (eff * occ)   (padded columns cost as real ones).
// A later candidate replaces the best so far only when it is more than 10% cheaper.
// `planes` = stride phases x groups (blocks per m x n tile).
struct SimtTile {
  int bm, bn;
};

// Every SIMT tile conv2d_gemm_float.cu instantiates, in the order of preference above.
constexpr SimtTile kSimtTiles[] = {{256, 16}, {128, 16}, {64, 16}, {128, 128}, {128, 64},
                                   {128, 32}, {64, 128},  {64, 64}, {64, 32}};
constexpr int kSimtTileCount = sizeof(kSimtTiles) / sizeof(kSimtTiles[0]);

inline double simt_tile_cost(int64_t rows, int ncols, int64_t planes, int sms, int bm, int bn) {
  const int64_t blocks = ((rows + bm - 1) / bm) * ((ncols + bn - 1) / bn) * planes;
  const int64_t per_sm = (blocks + sms - 1) / sms;
  const double tm = bm / 16, tn = bn / 16;
  const double eff = (tm * tn / 4) / (tm + tn) < 1 ? (tm * tn / 4) / (tm + tn) : 1.0;
  const double occ = per_sm <= 1 ? 0.5 : 1.0;
  return static_cast<double>(per_sm) * bm * bn / (eff * occ);
}

// The GEMM's column tile: the smallest of 32, 64, 128 covering the channels (capped at 128).
inline int column_tile(int ncols) { return ncols <= 32 ? 32 : ncols <= 64 ? 64 : 128; }

// Round 2's fixed rule: 256 x 16 up to 16 columns, else 128 rows by column_tile.
inline SimtTile simt_fixed_tile(int ncols) {
  return ncols <= 16 ? SimtTile{256, 16} : SimtTile{128, column_tile(ncols)};
}

inline SimtTile simt_image_tile(int64_t rows, int ncols, int64_t planes, int sms) {
  const int top = simt_fixed_tile(ncols).bn;  // the widest candidate column tile (16 up to 16 columns)
  SimtTile best{0, 0};
  double best_cost = 0;
  for (const SimtTile& t : kSimtTiles) {
    if ((t.bn == 16) != (ncols <= 16) || t.bn > top) continue;
    const double c = simt_tile_cost(rows, ncols, planes, sms, t.bm, t.bn);
    if (best.bm == 0 || c < 0.9 * best_cost) {
      best = t;
      best_cost = c;
    }
  }
  return best;
}

}  // namespace conv
}  // namespace convrnn
