// Pooling geometry as the CUDA kernels see it (in their index type), and the decomposition
// of a linear element index in NCHW or channels_last order.
#pragma once

#include <utility>

#include "pooling.h"

namespace convrnn {

template <typename index_t>
struct PoolDims {
  index_t N, C, H, W, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw;

  explicit PoolDims(const Pool2d& g)
      : N(g.N), C(g.C), H(g.H), W(g.W), OH(g.OH), OW(g.OW), kh(g.kh), kw(g.kw), sh(g.sh), sw(g.sw), ph(g.ph),
        pw(g.pw), dh(g.dh), dw(g.dw) {}
};

// Element e of an (N, C, rows, cols) tensor stored in NCHW (CL = false: col fastest) or
// channels_last (CL = true: channel fastest) order.
template <typename index_t>
struct Pos {
  index_t n, c, row, col;
};

template <bool CL, typename index_t>
CONVRNN_HD Pos<index_t> decompose(index_t e, index_t C, index_t rows, index_t cols) {
  Pos<index_t> p;
  if (CL) {
    p.c = e % C;
    index_t q = e / C;
    p.col = q % cols;
    q /= cols;
    p.row = q % rows;
    p.n = q / rows;
  } else {
    p.col = e % cols;
    index_t q = e / cols;
    p.row = q % rows;
    q /= rows;
    p.c = q % C;
    p.n = q / C;
  }
  return p;
}

// The same with precomputed divisors (no divide instruction for 32-bit indices).
template <typename index_t>
struct PosDividers {
  Divider<index_t> C, rows, cols;
  PosDividers(index_t C_, index_t rows_, index_t cols_) : C(C_), rows(rows_), cols(cols_) {}
};

template <bool CL, typename index_t>
CONVRNN_HD Pos<index_t> decompose(index_t e, const PosDividers<index_t>& dv) {
  Pos<index_t> p;
  if (CL) {
    index_t q = divmod(e, dv.C, p.c);
    q = divmod(q, dv.cols, p.col);
    p.n = divmod(q, dv.rows, p.row);
  } else {
    index_t q = divmod(e, dv.cols, p.col);
    q = divmod(q, dv.rows, p.row);
    p.n = divmod(q, dv.C, p.c);
  }
  return p;
}

// Offset of element (n, c, 0, 0) of an (N, C, rows, cols) tensor; within the plane,
// element (r, q) is at offset + (r*cols + q) * plane_stride<CL>(C).
template <bool CL, typename index_t>
CONVRNN_HD index_t plane_offset(index_t n, index_t c, index_t C, index_t rows, index_t cols) {
  return CL ? n * rows * cols * C + c : (n * C + c) * rows * cols;
}

template <bool CL, typename index_t>
CONVRNN_HD index_t plane_stride(index_t C) {
  return CL ? C : index_t(1);
}

// Linear index of output (oh, ow) of the same (n, c) as input position p.
template <bool CL, typename index_t>
CONVRNN_HD index_t output_index(const Pos<index_t>& p, index_t OH, index_t OW, index_t C, index_t oh, index_t ow) {
  return CL ? ((p.n * OH + oh) * OW + ow) * C + p.c : ((p.n * C + p.c) * OH + oh) * OW + ow;
}

// Calls f with a run-time flag as a compile-time constant (std::true_type or std::false_type).
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type());
  } else {
    f(std::false_type());
  }
}

// Calls f with channels_last as a compile-time constant.
template <typename F>
void with_layout(bool channels_last, F&& f) {
  with_flag(channels_last, std::forward<F>(f));
}

}  // namespace convrnn
