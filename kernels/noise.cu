// Lattice noise: counter-based uniforms (minus a shift) on the lattice points a + (0..n-1)
// per axis, written to a C-ordered float32 array of shape (n0, n1, n2). The GPU twin of
// synthgen._cpu_kernels.lattice_uniform. One thread per output element; every element is
// written.
#include "hash.cuh"

extern "C" __global__ void sg_lattice_uniform(
    float* __restrict__ out,
    unsigned int k0, unsigned int k1,
    int a0, int n0, int a1, int n1, int a2, int n2,
    float shift)
{
    long long total = (long long)n0 * n1 * n2;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)blockDim.x * gridDim.x) {
        int i, j, k;
        sg_unravel3(t, n1, n2, &i, &j, &k);
        out[t] = sg_uniform(k0, k1, sg_lattice_index(a0 + i, a1 + j, a2 + k)) - shift;
    }
}
