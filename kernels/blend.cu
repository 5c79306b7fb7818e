// Fused blend of one tumor into its cluster's change array: one thread per voxel of the box,
// the texture interpolated on the fly; the larger |change| wins (as merge_strongest on the
// CPU). Then sg_apply_delta writes input - change into the image in place and counts the
// tumor's voxels and their summed change (for the per-tumor statistics).
#include "blend.cuh"

extern "C" __global__ void sg_blend_tumor(
    const float* __restrict__ orig, const unsigned char* __restrict__ organ,
    float tlo, float thi, const float* __restrict__ blur, const float* __restrict__ tgrid,
    int gy, int gz,
    const long long* __restrict__ i0, const float* __restrict__ f0,
    const long long* __restrict__ i1, const float* __restrict__ f1,
    const long long* __restrict__ i2, const float* __restrict__ f2,
    float contrast, float organ_hu, int clipped, int nx, int ny, int nz,
    float* __restrict__ delta)
{
    long long total = (long long)nx * ny * nz;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        int i, j, k;
        sg_unravel3(t, ny, nz, &i, &j, &k);
        float b = blur[t];
        float v = orig[t];
        if (b <= 0.0f || v < tlo || v > thi) continue;
        float tex = sg_texture_at(tgrid, gy, gz, (int)i0[i], f0[i], (int)i1[j], f1[j],
                                  (int)i2[k], f2[k]);
        float d = sg_blend_delta(v, organ[t], b, tex, tlo, thi, contrast, organ_hu, clipped);
        if (fabsf(d) > fabsf(delta[t])) delta[t] = d;
    }
}

// out: the image box (float32 view of the working copy), written where delta != 0.
// stats[0] += tumor voxels, stats[1] += sum over them of (orig - written).
extern "C" __global__ void sg_apply_delta(
    float* __restrict__ out, const float* __restrict__ orig, const float* __restrict__ delta,
    const unsigned char* __restrict__ mask, float cmin, float cmax, float lo, float hi,
    int round_int, long long total, double* __restrict__ stats)
{
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        float o = orig[t];
        float d = delta[t];
        float w = o;
        if (d != 0.0f) {
            w = sg_apply(o, d, cmin, cmax, lo, hi, round_int);
            out[t] = w;
        }
        if (mask[t]) {
            atomicAdd(&stats[0], 1.0);
            atomicAdd(&stats[1], (double)(o - w));  // float32 difference, as numba computes it
        }
    }
}
