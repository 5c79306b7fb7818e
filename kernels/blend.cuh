// The blend of one tumor into a voxel, and the write-back of the merged change: the CUDA C
// twins of synthgen._cpu_kernels.blend_tumor and apply_delta, with the same operations in
// the same order and precision (compile with --fmad=false for the CPU's rounding).
#pragma once
#include "hash.cuh"

#ifndef __CUDACC__
#include <math.h>
#endif

// The texture rescale of one grid value (as sg_seg_tex_scale): clip(v * fac, 0, 1).
SG_FN float sg_rescaled(float v, float fac) {
    v = v * fac;
    v = v > 0.0f ? v : 0.0f;
    return v < 1.0f ? v : 1.0f;
}

// The bilinear weights of a texture grid's four rows at fractions (u0, u1), in float64 and
// rounded to float32 as the CPU kernel's w00, w01, w10, w11 (once per (i, j) there; the
// segmented blend reads them from sg_seg_interp's per-(i, j) table, which calls this).
SG_FN void sg_bilinear(float u0, float u1, float* w) {
    w[0] = (float)((1.0 - (double)u0) * (1.0 - (double)u1));
    w[1] = (float)((1.0 - (double)u0) * (double)u1);
    w[2] = (float)((double)u0 * (1.0 - (double)u1));
    w[3] = (float)((double)u0 * (double)u1);
}

// Texture T from the bilinear weights w of four rows of the grid tgrid ((gx, gy, gz) float32,
// C order, rescaled): row (a0, a1) at element o of the grid, (a0, a1 + 1), (a0 + 1, a1),
// (a0 + 1, a1 + 1), each at columns c and c + 1, then linear along k with fraction u2: as
// the CPU kernel, which builds the bilinear row once per (i, j). Offsets in 32 bits (a grid
// has far fewer than 2^31 values): one wide address a read, the + 1 an immediate.
SG_FN float sg_texture_w(const float* tgrid, int o, int gy, int gz, const float* w, int c,
                         float u2) {
    const float* t00 = tgrid + (o + c);
    const float* t01 = tgrid + (o + c + gz);
    const float* t10 = tgrid + (o + c + gy * gz);
    const float* t11 = tgrid + (o + c + gy * gz + gz);
    const float w00 = w[0], w01 = w[1], w10 = w[2], w11 = w[3];
    float r0 = w00 * t00[0] + w01 * t01[0] + w10 * t10[0] + w11 * t11[0];
    float r1 = w00 * t00[1] + w01 * t01[1] + w10 * t10[1] + w11 * t11[1];
    return r0 + (r1 - r0) * u2;
}

// Texture T at a voxel: bilinear in (i, j) on the grid rows a0/a0+1, a1/a1+1 (fractions u0,
// u1), at column c with fraction u2 (sg_texture_w on a grid rescaled in place).
SG_FN float sg_texture_at(const float* tgrid, int gy, int gz, int a0, float u0, int a1,
                          float u1, int c, float u2) {
    float w[4];
    sg_bilinear(u0, u1, w);
    return sg_texture_w(tgrid, (a0 * gy + a1) * gz, gy, gz, w, c, u2);
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

SG_FN float sg_clamp01(float x) {
    x = x > 0.0f ? x : 0.0f;
    return x < 1.0f ? x : 1.0f;
}

// Counter-hash noise of lattice point (gi, gj, gk) (voxels from the tumor centre): sw x white
// (Irwin-Hall sum of 4 uniforms, unit variance) plus sc x correlated (2x2x2 box mean of a
// second white lattice, unit variance, lag-1 correlation 0.5 per axis). keys: white k0, k1,
// correlated k0, k1. The twin of synthgen._cpu_kernels._noise_at.
SG_FN float sg_noise_at(const sg_u32* keys, int gi, int gj, int gk, float sw, float sc) {
    float n = 0.0f;
    if (sw != 0.0f) {
        sg_u32 idx = sg_lattice_index(gi, gj, gk);
        sg_u32 k0 = keys[0], k1 = keys[1];
        float s = sg_uniform(k0, k1, idx) + sg_uniform(k0, k1 ^ 0x85EBCA6Bu, idx) +
                  sg_uniform(k0, k1 ^ 0xC2B2AE35u, idx) + sg_uniform(k0, k1 ^ 0x27D4EB2Fu, idx);
        n = sw * ((s - 2.0f) * 1.7320508075688772f);
    }
    if (sc != 0.0f) {
        float s = 0.0f;
        for (int a = 0; a < 2; ++a)
            for (int b = 0; b < 2; ++b)
                for (int c = 0; c < 2; ++c)
                    s = s + sg_uniform(keys[2], keys[3], sg_lattice_index(gi + a, gj + b, gk + c));
        n = n + sc * ((s - 4.0f) * 1.224744871391589f);
    }
    return n;
}

// The change of one voxel under the appearance modes (the twin of
// synthgen._cpu_kernels._appear_delta; layout of app and keys: synthgen._appearance). Called
// where sg_blend_delta would not return early. q2: the squared normalised radius from the
// shape pass; td = T * D.
SG_FN float sg_appear_delta(float v, int inside, float b, float td, float q2, float organ_hu,
                            const float* app, const sg_u32* keys, int gi, int gj, int gk) {
    float q = sqrtf(q2);
    if (app[2] != 0.0f) {  // rim; it keeps app[6] of a darkening (never brighter)
        float t0 = td;
        td = td - app[2] * sg_clamp01((q - app[0]) * app[1]);
        if (t0 > 0.0f && td < app[6] * t0) td = app[6] * t0;
    }
    float w = 0.0f;
    if (app[4] > 0.0f) w = sg_clamp01((app[3] - q) * app[4] + 0.5f);  // necrotic core
    float n = 0.0f;
    if (!inside || w > 0.0f) n = sg_noise_at(keys, gi, gj, gk, app[11], app[12]);
    float d = inside ? td * b : b * (v - organ_hu + td - n);
    if (w > 0.0f) {
        float dn = b * (v - (app[5] + n));
        d = d + w * (dn - d);
    }
    if (app[7] > 0.0f && q < app[10]) {  // calcification specks
        sg_u32 idx = sg_lattice_index(gi, gj, gk);
        if (sg_uniform(keys[4], keys[5], idx) < app[7])
            d = v - (app[8] + app[9] * sg_uniform(keys[6], keys[7], idx));
    }
    return d;
}

// The value written for input o and merged change d (d != 0): a darkened voxel never goes
// below cmin (a brightened one above cmax) unless it already was; integer outputs rounded
// half to even; clipped to [lo, hi] widened to o (a value already outside, -3024 HU padding
// or an extended-HU metal clip, is never clamped into the range). A NaN voxel (no data, a
// float scan's padding) stays NaN, as on the CPU, and so does a NaN o - d (an infinite
// voxel and change of the same sign), as the CPU's min and max leave it. The bounds by fminf
// and fmaxf, one instruction each on a GPU where comparisons take a compare and a select
// (benchmarks/count_sass.py --per-element): the CPU twin's values, bit for bit against
// bounds that are not 0 (against a bound of 0 a zero result's sign may differ: fminf and
// fmaxf break a tie of zeros their own way; with -ftz=true a subnormal voxel at a bound
// reads as 0, some 1e-38 HU).
SG_FN float sg_apply(float o, float d, float cmin, float cmax, float lo, float hi,
                     int round_int) {
    if (o != o) return o;
    float v = o - d;
    if (v != v) return v;
    if (d > 0.0f)
        v = fmaxf(v, fminf(o, cmin));
    else
        v = fminf(v, fmaxf(o, cmax));
#ifdef __CUDACC__
    if (round_int) v = rintf(v);
#else
    if (round_int) v = __builtin_rintf(v);
#endif
    return fminf(fmaxf(v, fminf(o, lo)), fmaxf(o, hi));
}
