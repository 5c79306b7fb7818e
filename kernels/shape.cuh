// Deformed-ellipsoid test of one voxel, the B-spline displacement fused in: the CUDA C twin
// of synthgen._cpu_kernels.shape_mask, with the same operations in the same order and
// precision, so that without FMA contraction (NVRTC --fmad=false) the result is the CPU's.
//
// A voxel x is tumor when |m (x + d(x))| <= 1, with
// d(x) = sum_abe ctrl[:, a, b, e] w0[a] w1[b] w2[e] (cubic B-spline weights of the voxel).
#pragma once
#include "hash.cuh"

#ifndef __CUDACC__
#include <math.h>
#endif

// Control grids have at most this many points per axis (presets: control_points in [2, 8]).
#define SG_G_MAX 8

// One row of the cubic B-spline weight matrix, for position t in control-index units: the
// CUDA C twin of synthgen._cpu_kernels._bspline_rows_into (the same float64 operations in
// the same order): the raw weights of the four nearest control points (mirror boundaries),
// times the g x g prefilter pre (row major), summed in ascending order, rounded to float32.
SG_FN void sg_bspline_row(double t, int g, const double* pre, float* out) {
    double raw[SG_G_MAX];
    for (int j = 0; j < g; ++j) raw[j] = 0.0;
    // min(max(t, 0), g - 1) as Python's max and min take it (a NaN stays NaN)
    double x = 0.0 > t ? 0.0 : t;
    x = (double)(g - 1) < x ? (double)(g - 1) : x;
    if (x != x) {  // NaN (a degenerate extent): no weight is < 2 away, the row is zero
        for (int k = 0; k < g; ++k) out[k] = 0.0f;
        return;
    }
    const int base = (int)floor(x);
    const int period = 2 * (g - 1);
    for (int off = -1; off < 3; ++off) {
        const int j = base + off;
        const double ax = fabs(x - (double)j);
        double b;
        if (ax < 1.0) {
            b = 2.0 / 3.0 - ax * ax + 0.5 * ax * ax * ax;
        } else if (ax < 2.0) {
            const double c = 2.0 - ax;
            b = c * c * c / 6.0;
        } else {
            continue;
        }
        int jj = 0;
        if (g != 1) {  // mirror: |j| folded into [0, g)
            jj = j < 0 ? -j : j;
            if (jj >= period) jj %= period;
            if (jj >= g) jj = period - jj;
        }
        raw[jj] += b;
    }
    for (int k = 0; k < g; ++k) {
        double acc = 0.0;
        for (int j = 0; j < g; ++j) acc += raw[j] * pre[j * g + k];
        out[k] = (float)acc;
    }
}

// The test splits as the CPU kernel splits it: for a fixed (i, j) of the box, q is affine in
// the axis-2 quantities, q_c = a_c + m_c2 p2 + sum_e bm[c][e] w2[e]. sg_shape_row computes a
// box row's a_c and bm once (3 g0 g1 g2 products), sg_shape_q2_row each voxel's q^2 from them
// (3 g2 products): a GPU thread per voxel otherwise redoes the row's work per voxel.

// ctrl: (3, g0, g1, g2) float32, C order; w0/w1: the row's weight rows (g0/g1); p0, p1: the
// row's position relative to the tumor centre (mm); m: 3x3 float64, row major
// (diag(1/r) @ R.T). Writes row = (a_0, a_1, a_2, bm[0][0..g2), bm[1][...], bm[2][...]).
SG_FN void sg_shape_row(const float* ctrl, int g0, int g1, int g2, const float* w0,
                        const float* w1, float p0, float p1, const double* m, float* row) {
    // the axis-0/1 part, as the CPU kernel's a_c
    for (int c = 0; c < 3; ++c)
        row[c] = (float)(m[3 * c + 0] * (double)p0 + m[3 * c + 1] * (double)p1);
    for (int e = 0; e < g2; ++e) {
        float d[3];
        for (int c = 0; c < 3; ++c) {
            float acc = 0.0f;
            for (int a = 0; a < g0; ++a) {
                float wa = w0[a];
                for (int b = 0; b < g1; ++b)
                    acc += ctrl[((c * g0 + a) * g1 + b) * g2 + e] * wa * w1[b];
            }
            d[c] = acc;
        }
        for (int c = 0; c < 3; ++c)
            row[3 + c * g2 + e] = (float)(m[3 * c + 0] * (double)d[0] +
                                          m[3 * c + 1] * (double)d[1] +
                                          m[3 * c + 2] * (double)d[2]);
    }
}

// |q|^2 of a voxel of a row (see sg_shape_row): w2 its weight row (g2), p2 its position.
SG_FN float sg_shape_q2_row(const float* row, int g2, const float* w2, float p2,
                            const double* m) {
    float q[3];
    for (int c = 0; c < 3; ++c) q[c] = row[c] + (float)m[3 * c + 2] * p2;
    for (int e = 0; e < g2; ++e)
        for (int c = 0; c < 3; ++c) q[c] += row[3 + c * g2 + e] * w2[e];
    return q[0] * q[0] + q[1] * q[1] + q[2] * q[2];
}
