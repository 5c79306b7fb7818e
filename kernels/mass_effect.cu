// Mass effect on the GPU: the twins of synthgen.mass_effect._warp_rows (the warp of an image
// box by the composed radial fields of a group of tumors) and _gather_rows (the label maps'
// voxels from the nearest source voxel), for image boxes already on the device
// (synthgen._mass_gpu drives them). Each thread takes voxels of the box in a grid-stride
// walk; the float64 operations are those of the numba kernels in their order (NVRTC with
// --fmad=false), so the warped box is the CPU's bit for bit.
//
// The CPU warps a C-contiguous copy of the box, padded with its last plane repeated once
// along each axis; here the copy is not padded and a read past the last plane clamps to it
// (the same values). Its walk visits, per row (i, j), only the k between the roots of each
// field's support quadratic (the union of those ranges); a voxel outside it is left as it
// is, here too: the range is computed per voxel by the same operations.
#include "segmented.cuh"

// strength * phi(rho) / rho at q = (rho / reach)^2 (mass_effect._psi)
SG_FN double sg_me_psi(double q, double strength, double reach) {
    const double r2 = reach * reach * q;
    if (r2 <= 1.0) return strength * 0.5 * (3.0 - r2);
    const double rho = sqrt(r2);
    const double tau = (rho - 1.0) / (reach - 1.0);
    return strength * (1.0 - tau * tau * (3.0 - 2.0 * tau)) / rho;
}

// One field's parameters: P + 14 * f = centre (3, box voxel coordinates), metric (3 x 3, row
// major: offsets from the centre to the support's unit coordinates), strength, reach.
#define SG_ME_STRIDE 14

// The difference of two source voxels as the numba kernel types it: signed integers (and the
// CPU's int64 copy of unsigned ones) in 64-bit integers, float32 in float32, float64 in
// float64; the trilinear sums in float64 from there.
template <class T> struct sg_me_wide { typedef long long type; };
template <> struct sg_me_wide<float> { typedef float type; };
template <> struct sg_me_wide<double> { typedef double type; };

template <class T>
SG_FN double sg_me_lerp(const T* src, long long a, long long b, double r) {
    typedef typename sg_me_wide<T>::type W;
    const W va = (W)src[a];
    const W d = (W)src[b] - va;
    return (double)va + (double)d * r;
}

template <class T>
SG_FN void sg_me_store(void* dst, long long at, double v) { ((T*)dst)[at] = (T)v; }

template <class T>
SG_FN void sg_me_warp_voxel(const double* __restrict__ P, int K, int n0, int n1, int n2,
                            const T* __restrict__ src, void* dst, long long ds0, long long ds1,
                            long long ds2, int rnd, double lo, double hi,
                            int* __restrict__ nn, long long t)
{
    const long long n12 = (long long)n1 * n2;
    const int i = (int)(t / n12);
    const long long rest = t - (long long)i * n12;
    const int j = (int)(rest / n2);
    const int k = (int)(rest - (long long)j * n2);
    // the row's range of k crossing a support (the union over the fields)
    int klo = n2, khi = 0;
    for (int f = 0; f < K; ++f) {
        const double* p = P + SG_ME_STRIDE * f;
        const double* m = p + 3;
        const double d0 = (double)i - p[0];
        const double d1 = (double)j - p[1];
        const double c0 = m[2], c1 = m[5], c2 = m[8];
        const double a0 = m[0] * d0 + m[1] * d1 - c0 * p[2];
        const double a1 = m[3] * d0 + m[4] * d1 - c1 * p[2];
        const double a2 = m[6] * d0 + m[7] * d1 - c2 * p[2];
        const double cc = c0 * c0 + c1 * c1 + c2 * c2;
        const double b = a0 * c0 + a1 * c1 + a2 * c2;
        const double disc = b * b - cc * (a0 * a0 + a1 * a1 + a2 * a2 - 1.0);
        if (disc > 0.0) {
            const double sq = sqrt(disc);
            const double fl = floor((-b - sq) / cc);
            const double ce = ceil((-b + sq) / cc);
            // (as Python's int(math.floor(...)): the roots of a box's row are small)
            const long long flo = (long long)fl, cei = (long long)ce + 1;
            const long long l = flo > 0 ? flo : 0;
            const long long h = cei < n2 ? cei : n2;
            klo = l < klo ? (int)l : klo;
            khi = h > khi ? (int)h : khi;
        }
    }
    if (khi <= klo || k < klo || k >= khi) {
        if (nn) nn[t] = -1;
        return;
    }
    // the last field acts on the voxel itself, then the others in reverse order
    const int last = K - 1;
    const double* pl = P + SG_ME_STRIDE * last;
    const double* lm = pl + 3;
    const double e0 = (double)i - pl[0];
    const double e1 = (double)j - pl[1];
    const double h0 = lm[0] * e0 + lm[1] * e1;
    const double h1 = lm[3] * e0 + lm[4] * e1;
    const double h2 = lm[6] * e0 + lm[7] * e1;
    const double e2 = (double)k - pl[2];
    double q0 = h0 + lm[2] * e2;
    double q1 = h1 + lm[5] * e2;
    double q2 = h2 + lm[8] * e2;
    double q = q0 * q0 + q1 * q1 + q2 * q2;
    bool moved = q < 1.0;
    double y0 = (double)i, y1 = (double)j, y2 = (double)k;
    if (moved) {
        const double w = 1.0 - sg_me_psi(q, pl[12], pl[13]);
        y0 = pl[0] + w * e0;
        y1 = pl[1] + w * e1;
        y2 = pl[2] + w * e2;
    }
    for (int f = last - 1; f >= 0; --f) {
        const double* p = P + SG_ME_STRIDE * f;
        const double* m = p + 3;
        const double d0 = y0 - p[0];
        const double d1 = y1 - p[1];
        const double d2 = y2 - p[2];
        q0 = m[0] * d0 + m[1] * d1 + m[2] * d2;
        q1 = m[3] * d0 + m[4] * d1 + m[5] * d2;
        q2 = m[6] * d0 + m[7] * d1 + m[8] * d2;
        q = q0 * q0 + q1 * q1 + q2 * q2;
        if (q >= 1.0) continue;
        const double w = 1.0 - sg_me_psi(q, p[12], p[13]);
        y0 = p[0] + w * d0;
        y1 = p[1] + w * d1;
        y2 = p[2] + w * d2;
        moved = true;
    }
    if (!moved) {
        if (nn) nn[t] = -1;
        return;
    }
    // (min(max(y, 0.0), top) as Python's builtins: the first argument unless the second is
    // greater, or smaller)
    const double top0 = n0 - 1.0, top1 = n1 - 1.0, top2 = n2 - 1.0;
    double s0 = 0.0 > y0 ? 0.0 : y0;
    double s1 = 0.0 > y1 ? 0.0 : y1;
    double s2 = 0.0 > y2 ? 0.0 : y2;
    s0 = top0 < s0 ? top0 : s0;
    s1 = top1 < s1 ? top1 : s1;
    s2 = top2 < s2 ? top2 : s2;
    const int x0 = (int)s0, x1 = (int)s1, x2 = (int)s2;
    const double r0 = s0 - x0, r1 = s1 - x1, r2 = s2 - x2;
    // the padded copy's reads: one past the last plane is the last plane
    const long long u0 = x0 + 1 < n0 ? x0 + 1 : n0 - 1;
    const long long u1 = x1 + 1 < n1 ? x1 + 1 : n1 - 1;
    const long long u2 = x2 + 1 < n2 ? x2 + 1 : n2 - 1;
    const long long b00 = ((long long)x0 * n1 + x1) * n2, b01 = ((long long)x0 * n1 + u1) * n2;
    const long long b10 = (u0 * n1 + x1) * n2, b11 = (u0 * n1 + u1) * n2;
    const double v00 = sg_me_lerp(src, b00 + x2, b00 + u2, r2);
    const double v01 = sg_me_lerp(src, b01 + x2, b01 + u2, r2);
    const double v10 = sg_me_lerp(src, b10 + x2, b10 + u2, r2);
    const double v11 = sg_me_lerp(src, b11 + x2, b11 + u2, r2);
    const double v0 = v00 + (v01 - v00) * r1;
    const double v1 = v10 + (v11 - v10) * r1;
    double v = v0 + (v1 - v0) * r0;
    if (rnd) {
        v = rint(v);
        v = lo > v ? lo : v;
        v = hi < v ? hi : v;
    }
    sg_me_store<T>(dst, ds0 * i + ds1 * j + ds2 * k, v);
    if (nn) {
        // the corner of largest weight (at the top edge r == 0, so x stays)
        const int m0 = r0 >= 0.5 ? x0 + 1 : x0;
        const int m1 = r1 >= 0.5 ? x1 + 1 : x1;
        const int m2 = r2 >= 0.5 ? x2 + 1 : x2;
        nn[t] = (int)(((long long)m0 * n1 + m1) * n2 + m2);
    }
}

// The warp of one group's box: image box at dst (element strides ds*; dtype code), source
// copy at src (C-contiguous, the box's shape, the image's dtype), K fields at P; nn (0: no
// label maps) gets, per voxel of the box, the flat index of its label source voxel or -1.
// Integer images (rnd) round half to even and clip to [lo, hi]. nblocks: the grid's blocks.
extern "C" __global__ void sg_me_warp(long long P, int K, int n0, int n1, int n2, long long src,
                                      long long dst, long long ds0, long long ds1,
                                      long long ds2, int code, int rnd, double lo, double hi,
                                      long long nn, int nblocks)
{
    const long long total = (long long)n0 * n1 * n2;
    const long long step = (long long)nblocks * blockDim.x;
    const double* prm = (const double*)P;
    int* nnp = (int*)nn;
    void* d = (void*)dst;
#define SG_ME_WARP_AS(T)                                                                     \
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) \
        sg_me_warp_voxel<T>(prm, K, n0, n1, n2, (const T*)src, d, ds0, ds1, ds2, rnd, lo, hi, \
                            nnp, t)
    SG_AS_CODE(code, SG_ME_WARP_AS);
#undef SG_ME_WARP_AS
}

template <class E>
SG_FN void sg_me_gather_as(const E* __restrict__ src, E* dst, long long ds0, long long ds1,
                           long long ds2, int n1, int n2, const int* __restrict__ nn,
                           long long total, long long step)
{
    const long long n12 = (long long)n1 * n2;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        const int f = nn[t];
        if (f < 0) continue;
        const int i = (int)(t / n12);
        const long long rest = t - (long long)i * n12;
        const int j = (int)(rest / n2);
        const int k = (int)(rest - (long long)j * n2);
        dst[ds0 * i + ds1 * j + ds2 * k] = src[f];
    }
}

// A label map's box at dst (element strides ds*, elements of esize bytes: the bits copied,
// whatever the dtype) takes, where nn >= 0, the voxel nn of its source copy (C-contiguous).
extern "C" __global__ void sg_me_gather(long long src, long long dst, long long ds0,
                                        long long ds1, long long ds2, int n0, int n1, int n2,
                                        int esize, long long nn, int nblocks)
{
    const long long total = (long long)n0 * n1 * n2;
    const long long step = (long long)nblocks * blockDim.x;
    const int* nnp = (const int*)nn;
    switch (esize) {
        case 1:
            sg_me_gather_as((const unsigned char*)src, (unsigned char*)dst, ds0, ds1, ds2, n1,
                            n2, nnp, total, step);
            break;
        case 2:
            sg_me_gather_as((const unsigned short*)src, (unsigned short*)dst, ds0, ds1, ds2,
                            n1, n2, nnp, total, step);
            break;
        case 4:
            sg_me_gather_as((const sg_u32*)src, (sg_u32*)dst, ds0, ds1, ds2, n1, n2, nnp,
                            total, step);
            break;
        default:
            sg_me_gather_as((const unsigned long long*)src, (unsigned long long*)dst, ds0, ds1,
                            ds2, n1, n2, nnp, total, step);
            break;
    }
}
