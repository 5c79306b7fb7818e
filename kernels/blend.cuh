// The blend of one tumor into a voxel, and the write-back of the merged change: the CUDA C
// twins of synthgen._cpu_kernels.blend_tumor and apply_delta, with the same operations in
// the same order and precision (compile with --fmad=false for the CPU's rounding).
#pragma once
#include "hash.cuh"

// Texture T at a voxel: bilinear in (i, j) on the grid rows a0/a0+1, a1/a1+1 at columns c
// and c+1, then linear along k: as the CPU kernel, which builds the bilinear row once per
// (i, j). tgrid is (gx, gy, gz) float32, C order.
SG_FN float sg_texture_at(const float* tgrid, int gy, int gz, int a0, float u0, int a1,
                          float u1, int c, float u2) {
    float w00 = (float)((1.0 - (double)u0) * (1.0 - (double)u1));
    float w01 = (float)((1.0 - (double)u0) * (double)u1);
    float w10 = (float)((double)u0 * (1.0 - (double)u1));
    float w11 = (float)((double)u0 * (double)u1);
    const float* t00 = tgrid + ((long long)a0 * gy + a1) * gz;
    const float* t01 = t00 + gz;
    const float* t10 = t00 + (long long)gy * gz;
    const float* t11 = t10 + gz;
    float r0 = w00 * t00[c] + w01 * t01[c] + w10 * t10[c] + w11 * t11[c];
    float r1 = w00 * t00[c + 1] + w01 * t01[c + 1] + w10 * t10[c + 1] + w11 * t11[c + 1];
    return r0 + (r1 - r0) * u2;
}

// The change d (output = input - d) one tumor asks of a voxel; 0 when it leaves it alone.
// Inside the organ: T*B*D (the published formula). Outside, for an unclipped (exophytic)
// tumor: tissue replaced by tumor tissue of intensity organ_hu - T*D, weighted by B.
SG_FN float sg_blend_delta(float v, int inside, float b, float tex, float tlo, float thi,
                           float contrast, float organ_hu, int clipped) {
    if (b <= 0.0f || v < tlo || v > thi) return 0.0f;
    if (!inside && clipped) return 0.0f;
    float td = tex * contrast;
    return inside ? td * b : b * (v - organ_hu + td);
}

// The value written for input o and merged change d (d != 0): a darkened voxel never goes
// below cmin (a brightened one above cmax) unless it already was; integer outputs rounded
// half to even; clipped to [lo, hi].
SG_FN float sg_apply(float o, float d, float cmin, float cmax, float lo, float hi,
                     int round_int) {
    float v = o - d;
    if (d > 0.0f) {
        float floor_v = o < cmin ? o : cmin;
        v = v > floor_v ? v : floor_v;
    } else {
        float ceil_v = o > cmax ? o : cmax;
        v = v < ceil_v ? v : ceil_v;
    }
#ifdef __CUDACC__
    if (round_int) v = rintf(v);
#else
    if (round_int) v = __builtin_rintf(v);
#endif
    v = v > lo ? v : lo;
    return v < hi ? v : hi;
}
