// Deformed-ellipsoid test of one voxel, the B-spline displacement fused in: the CUDA C twin
// of synthgen._cpu_kernels.shape_mask, with the same operations in the same order and
// precision, so that without FMA contraction (NVRTC --fmad=false) the result is the CPU's.
//
// A voxel x is tumor when |m (x + d(x))| <= 1, with
// d(x) = sum_abe ctrl[:, a, b, e] w0[a] w1[b] w2[e] (cubic B-spline weights of the voxel).
#pragma once
#include "hash.cuh"

// ctrl: (3, g0, g1, g2) float32, C order; w0/w1/w2: the voxel's weight rows (g0/g1/g2);
// p0, p1, p2: the voxel's position relative to the tumor centre (mm); m: 3x3 float64, row
// major (diag(1/r) @ R.T). Returns |q|^2 with q = m (x + d(x)).
SG_FN float sg_shape_q2(const float* ctrl, int g0, int g1, int g2, const float* w0,
                        const float* w1, const float* w2, float p0, float p1, float p2,
                        const double* m) {
    float q[3];
    for (int c = 0; c < 3; ++c) {
        // the axis-0/1 part, as the CPU kernel's a_c and m_c2 * pos2
        q[c] = (float)(m[3 * c + 0] * (double)p0 + m[3 * c + 1] * (double)p1);
        q[c] = q[c] + (float)m[3 * c + 2] * p2;
    }
    for (int e = 0; e < g2; ++e) {
        float row[3];
        for (int c = 0; c < 3; ++c) {
            float acc = 0.0f;
            for (int a = 0; a < g0; ++a) {
                float wa = w0[a];
                for (int b = 0; b < g1; ++b)
                    acc += ctrl[((c * g0 + a) * g1 + b) * g2 + e] * wa * w1[b];
            }
            row[c] = acc;
        }
        for (int c = 0; c < 3; ++c) {
            float bm = (float)(m[3 * c + 0] * (double)row[0] + m[3 * c + 1] * (double)row[1] +
                               m[3 * c + 2] * (double)row[2]);
            q[c] += bm * w2[e];
        }
    }
    return q[0] * q[0] + q[1] * q[1] + q[2] * q[2];
}
