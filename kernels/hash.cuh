// Counter-based hashing of synthgen: the CUDA C twin of synthgen/_hash.py and of the numba
// kernels in synthgen/_cpu_kernels.py (_mix32, _uniform, _lattice_index). Every random value
// of a render is a pure function of (tumor key, lattice index), so a GPU render reproduces the
// CPU's bit for bit.
//
// The functions are plain C++ on 32-bit unsigned integers: the same text compiles under NVRTC
// (as __device__ functions) and under a host C++ compiler, which is how the test suite checks
// it against the CPU path on a machine without a GPU (tests/test_kernels_host.py).
#pragma once

#ifdef __CUDACC__
#define SG_FN __device__ __forceinline__
typedef unsigned int sg_u32;
#else
#define SG_FN static inline
#include <stdint.h>
typedef uint32_t sg_u32;
#endif

// Chris Wellons' lowbias32: a bijection on 32-bit words with low bias.
SG_FN sg_u32 sg_mix32(sg_u32 x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

// Uniform float in [0, 1): the top 24 bits of h = mix32(mix32(index + k0) ^ k1), exact in
// float32 (24-bit mantissa), hence identical on every backend.
SG_FN float sg_uniform(sg_u32 k0, sg_u32 k1, sg_u32 index) {
    sg_u32 h = sg_mix32(sg_mix32(index + k0) ^ k1);
    return (float)(h >> 8) * (1.0f / 16777216.0f);
}

// Index of lattice point (i, j, k), each in [-512, 512): 10 bits per axis.
SG_FN sg_u32 sg_lattice_index(int i, int j, int k) {
    return ((sg_u32)(i + 512) << 20) | ((sg_u32)(j + 512) << 10) | (sg_u32)(k + 512);
}

// Voxel (i, j, k) of flat index t in a C-ordered (n0, n1, n2) array: the grid-stride loops of
// every kernel walk flat indices.
SG_FN void sg_unravel3(long long t, int n1, int n2, int* i, int* j, int* k) {
    if (t <= 0x7fffffffLL) {  // 32-bit division: several times cheaper on a GPU than 64-bit
        unsigned int u = (unsigned int)t, q = u / (unsigned int)n2;
        *k = (int)(u - q * (unsigned int)n2);
        *j = (int)(q % (unsigned int)n1);
        *i = (int)(q / (unsigned int)n1);
        return;
    }
    *k = (int)(t % n2);
    *j = (int)((t / n2) % n1);
    *i = (int)(t / ((long long)n1 * n2));
}

// The next voxel of a walk s elements on (s = n1 n2 di + n2 dj + dk, unravelled once by
// sg_unravel3): (i, j, k) of t advanced to those of t + s with one carry per axis (k + dk <
// 2 n2, j + dj + 1 < 2 n1), instead of two divisions per voxel. The streaming kernels step
// their SG_ILP elements of a step, blockDim.x apart, so.
SG_FN void sg_advance3(int* i, int* j, int* k, int di, int dj, int dk, int n1, int n2) {
    int c;
    *k += dk;
    c = *k >= n2;
    if (c) *k -= n2;
    *j += dj + c;
    c = *j >= n1;
    if (c) *j -= n1;
    *i += di + c;
}
