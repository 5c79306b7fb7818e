// Texture steps: the banded separable contraction (Gaussian lattice sums and the mask blur)
// and the Bernoulli block fractions. CUDA C twins of synthgen._cpu_kernels.band_contract3
// (one axis per pass) and block_sums, with the same operations in the same order and
// precision (compile with --fmad=false).
#pragma once
#include "hash.cuh"

#ifndef __CUDACC__
#include <math.h>
#endif

// One output element of a banded contraction along one axis of a C-ordered 3-D array:
// out = sum_t w[o, t] * in[.., s[o] + t, ..], accumulated in float32 from 0 in t order.
// `stride` is the input's element stride along the axis; `in0` points at the element with
// index 0 on that axis (the others fixed).
SG_FN float sg_band_point(const float* in0, long long stride, const long long* s,
                          const float* w, int K, int o) {
    float acc = 0.0f;
    const float* wr = w + (long long)o * K;
    const float* src = in0 + s[o] * stride;
    for (int t = 0; t < K; ++t) acc = acc + wr[t] * src[t * stride];
    return acc;
}

// Bernoulli block fraction of one block (see block_sums): p from the smoothed noise z,
// then p + sd * sqrt(12) * (u - 0.5) with sd = sqrt(p (1 - p) / n), in float64.
SG_FN float sg_block_fraction(float z, double nij, double inv_norm2, double base, double scale,
                              sg_u32 k0, sg_u32 k1, int bi, int bj, int bk, double inv_n) {
    double x = 0.5 + nij * (double)z * inv_norm2;
    x = x < 0.0 ? 0.0 : (x > 1.0 ? 1.0 : x);
    double p = base + scale * x;
    float u = sg_uniform(k0, k1, sg_lattice_index(bi, bj, bk));
    double var = p * (1.0 - p);
    double sd = sqrt((var > 0.0 ? var : 0.0) * inv_n);
    return (float)(p + sd * sqrt(12.0) * ((double)u - 0.5));
}
