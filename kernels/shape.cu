// Tumor shape mask of a box: one thread per voxel, the B-spline displacement and the
// ellipsoid test fused (no dense displacement array). The GPU twin of
// synthgen._cpu_kernels.shape_mask; every element of `out` is written.
#include "shape.cuh"

extern "C" __global__ void sg_shape_mask(
    const float* __restrict__ ctrl, int g0, int g1, int g2,
    const float* __restrict__ w0, const float* __restrict__ w1, const float* __restrict__ w2,
    const float* __restrict__ pos0, const float* __restrict__ pos1,
    const float* __restrict__ pos2, const double* __restrict__ m,
    const unsigned char* __restrict__ organ, const float* __restrict__ image,
    float tlo, float thi, int clip, int nx, int ny, int nz,
    unsigned char* __restrict__ out)
{
    long long total = (long long)nx * ny * nz;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        int i, j, k;
        sg_unravel3(t, ny, nz, &i, &j, &k);
        float q2 = sg_shape_q2(ctrl, g0, g1, g2, w0 + i * g0, w1 + j * g1, w2 + k * g2,
                               pos0[i], pos1[j], pos2[k], m);
        float v = image[t];
        out[t] = (unsigned char)((q2 <= 1.0f) && (!clip || organ[t]) && v >= tlo && v <= thi);
    }
}
