// Texture kernels: one banded contraction pass along one axis (three launches make
// band_contract3: axis 2, then 1, then 0), and the Bernoulli block fractions. One thread per
// output element; every element is written.
#include "texture.cuh"

// in: (n0, n1, n2) C order; out: the same with axis `axis` replaced by m (= rows of w).
extern "C" __global__ void sg_band_axis(
    const float* __restrict__ in, float* __restrict__ out, int n0, int n1, int n2, int axis,
    const long long* __restrict__ s, const float* __restrict__ w, int m, int K)
{
    int o0 = axis == 0 ? m : n0, o1 = axis == 1 ? m : n1, o2 = axis == 2 ? m : n2;
    long long total = (long long)o0 * o1 * o2;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        int a, b, c;
        sg_unravel3(t, o1, o2, &a, &b, &c);
        long long stride;
        const float* in0;
        int o;
        if (axis == 2) {
            stride = 1; o = c; in0 = in + ((long long)a * n1 + b) * n2;
        } else if (axis == 1) {
            stride = n2; o = b; in0 = in + (long long)a * n1 * n2 + c;
        } else {
            stride = (long long)n1 * n2; o = a; in0 = in + (long long)b * n2 + c;
        }
        out[t] = sg_band_point(in0, stride, s, w, K, o);
    }
}

extern "C" __global__ void sg_block_sums(
    const float* __restrict__ z, const double* __restrict__ inv_norm0,
    const double* __restrict__ inv_norm1, const double* __restrict__ inv_norm2,
    double zscale, double base, double scale, unsigned int k0, unsigned int k1,
    int b0, int b1, int b2, double n_cells, int nx, int ny, int nz, float* __restrict__ out)
{
    long long total = (long long)nx * ny * nz;
    double inv_n = 1.0 / n_cells;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        int i, j, k;
        sg_unravel3(t, ny, nz, &i, &j, &k);
        double nij = zscale * inv_norm0[i] * inv_norm1[j];
        out[t] = sg_block_fraction(z[t], nij, inv_norm2[k], base, scale, k0, k1, b0 + i,
                                   b1 + j, b2 + k, inv_n);
    }
}
