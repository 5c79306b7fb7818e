// Segmented kernels: every tumor of a batch in one launch per step (or group of steps).
//
// A batch of tumors (of one or many plans and scans) is a list of segments. Everything a
// segment needs is in one row of an int64 table T (sizes, buffer addresses, table addresses:
// device addresses stored as integers), a float32 table TF and a float64 table TD; column
// numbers are the SG_* constants of segmented.cuh, which the Python driver reads from that
// header. The arithmetic is the per-tumor kernels' (the same device functions), so results
// are the CPU path's.
//
// Launches use a flat 1-D grid over a schedule S of the segments (nS + 1 int32 prefix sums):
// blocks S[s] .. S[s+1] - 1 are segment s's, as many as its elements need (none for a
// segment with nothing to do in the step), and they walk the segment's elements with a
// block-stride loop. Segments differ in size by orders of magnitude (a tiny tumor's box and
// a large one's), so a 2-D grid sized for the largest (blockIdx.y the segment, as before)
// launched mostly blocks that had nothing to do: in a batch of 16 mix samples 87% of the
// fused blend's blocks. The host builds the schedules (synthgen._seg_tables.schedules_nb).
//
// A step is a device function (sg_step_*) called by its own kernel and, where steps do not
// depend on each other, by a kernel that runs two or three of them side by side, each block
// one step of one row (SG_STEPS_BEGIN): phase B's first launch, its blur passes beside its
// band sums, the write-back beside the label write.
#include "segmented.cuh"
#include "shape.cuh"
#include "texture.cuh"
#include "blend.cuh"

// Element t of a walk over the indices of a box's three axes (n0 of axis 0, then n1 of axis
// 1, then n2 of axis 2): its axis (returned) and its index on that axis (*q).
SG_FN int sg_axis_of(long long t, long long n0, long long n1, long long* q)
{
    const int a = t < n0 ? 0 : (t < n0 + n1 ? 1 : 2);
    *q = t - (a == 0 ? 0 : (a == 1 ? n0 : n0 + n1));
    return a;
}

// Which of the 32 probes lo, lo + step, ..., lo + 31 step of sg_segment_of's round are in
// [lo, hi] with S[probe] <= b: bit l for probe l. On a GPU each lane of warp 0 loads its own
// probe (one coalesced load for all 32) and the warp votes; under the host compiler (one
// thread a block) the lanes are a loop.
#ifdef __CUDACC__
__device__ __forceinline__ unsigned int sg_probe_ballot(const int* __restrict__ S, int lo,
                                                        int hi, int step, int b)
{
    const int p = lo + (int)(threadIdx.x & 31) * step;
    return __ballot_sync(0xffffffffu, p <= hi && S[p] <= b);
}
#define sg_high_bit(x) (31 - __clz((int)(x)))
#else
static inline unsigned int sg_probe_ballot(const int* S, int lo, int hi, int step, int b)
{
    unsigned int ok = 0;
    for (int l = 0; l < 32; ++l) {
        const int p = lo + l * step;
        ok |= (unsigned int)(p <= hi && S[p] <= b) << l;
    }
    return ok;
}
static inline int sg_high_bit(unsigned int x)
{
    int h = -1;
    for (; x; x >>= 1) ++h;
    return h;
}
#endif

// The segment of block b: the last s < n with S[s] <= b (segments without blocks are
// skipped: their S[s] equals the next one's). A 32-ary search, called by all 32 lanes of
// warp 0 alike: each round probes 32 evenly spaced entries of the range left at once and
// keeps the part from the last probe <= b to the next probe, so a block waits through
// ceil(log32 n) dependent loads before its first element instead of a binary search's
// ceil(log2 n) (one round instead of five for 20 segments, two instead of seven for 100).
SG_FN int sg_segment_of(const int* __restrict__ S, int n, int b)
{
    int lo = 0, hi = n - 1;  // S[lo] <= b (S[0] is 0, b >= 0): the answer is in [lo, hi]
    while (lo < hi) {
        const int step = (hi - lo) / 32 + 1;  // the 32 probes cover [lo, hi]
        lo += sg_high_bit(sg_probe_ballot(S, lo, hi, step, b)) * step;  // (probe 0 is <= b)
        hi = hi < lo + step - 1 ? hi : lo + step - 1;  // the next probe's is > b, or past hi
    }
    return lo;
}

// The start of every segmented kernel (parameters S and nS): the block's segment sg_s, its
// index sg_b among the segment's sg_nb blocks (at most 512: int arithmetic). Warp 0
// searches, thread 0 leaves them in shared memory, from which the compiler reloads them where it
// would otherwise hold them in registers throughout (with the search's result in registers,
// ptxas for sm_90 spilled in the blend at its 64-register bound and took the gather and the
// lattice from 40 and 32 registers to 48 and 44; a block-index expression, as blockIdx.y was,
// it simply recomputes).
#define SG_SEG_BEGIN                                                                          \
    __shared__ int sg_sh[3];                                                                  \
    if (threadIdx.x < 32) {                                                                   \
        const int s_ = sg_segment_of(S, nS, (int)blockIdx.x);                                 \
        if (threadIdx.x == 0) {                                                               \
            sg_sh[0] = s_;                                                                    \
            sg_sh[1] = (int)blockIdx.x - S[s_];                                               \
            sg_sh[2] = S[s_ + 1] - S[s_];                                                     \
        }                                                                                     \
    }                                                                                         \
    __syncthreads();                                                                          \
    const int sg_s = sg_sh[0], sg_b = sg_sh[1], sg_nb = sg_sh[2]

// The start of a launch of steps that do not depend on each other (parameters S and nR, the
// rows): its schedule lists the first step's rows, then the second's (and the third's), each
// row with the blocks its step needs (synthgen._seg_tables.chain_schedules_nb), so segment
// s is row sg_row = s % nR of step sg_step = s / nR; a block runs one step of one row. Each
// step is the function its own kernel calls (sg_step_*). One launch instead of two or three:
// one launch gap and one host call fewer each, and the small steps of a small call run side
// by side on the device instead of one after another.
#define SG_STEPS_BEGIN(k)                                                                     \
    const int nS = (k) * nR;                                                                  \
    SG_SEG_BEGIN;                                                                             \
    const int sg_step = sg_s / nR, sg_row = sg_s - sg_step * nR

// The block-stride loop over a segment's `total` elements.
#define SG_SEG_LOOP(total)                                                                    \
    for (long long t = sg_b * (int)blockDim.x + (int)threadIdx.x; t < (total);                \
         t += sg_nb * (int)blockDim.x)

// The same walk with SG_ILP elements per thread and step, blockDim.x apart (coalesced): a
// streaming kernel loads all of them before it computes, so a warp has SG_ILP loads in
// flight instead of one (the blend and write-back were latency-bound: on an H100 half their
// cycles waited on loads). Element u of a step is t0 + u * blockDim.x.
#define SG_ILP 4
#define SG_SEG_LOOP_ILP(total)                                                                \
    for (long long t0 = sg_b * (int)blockDim.x * SG_ILP + (int)threadIdx.x; t0 < (total);     \
         t0 += sg_nb * (int)blockDim.x * SG_ILP)
#define SG_ILP_T(u) (t0 + (long long)(u) * blockDim.x)
// The walk's first element of the thread, and the distance from a step's last element to
// the next step's first (the block-stride less the SG_ILP - 1 steps within a step).
#define SG_ILP_T0 ((long long)sg_b * (int)blockDim.x * SG_ILP + (int)threadIdx.x)
#define SG_ILP_REST ((long long)(sg_nb * SG_ILP - (SG_ILP - 1)) * (int)blockDim.x)

// A block with no element of its segment leaves at once: before a block reduction, whose
// barriers it would otherwise wait through. (A schedule gives a segment no more blocks than
// its elements need; a caller's may be coarser.) ``per`` is the elements per thread and step
// of the kernel's loop (1, or SG_ILP).
#define SG_SEG_IDLE(total, per)                                                               \
    if ((long long)sg_b * blockDim.x * (per) >= (total)) return

// Block reductions: a kernel's per-thread partial results (sums, minima, maxima) are combined
// within the block (warp shuffles, then one warp over the warps' results) before thread 0
// issues one atomic per block (a bounding box) or stores the block's sums for the row's
// last block to add in order (sg_row_sums). One atomic per thread serialised hundreds of
// thousands of atomics on the few addresses of a segment: on an H100 the write-back ran at
// 11 GB/s.
// Every thread of the block must call it (the kernels' early exits are per segment, that is
// per block); thread 0 holds the result. Under the host compiler of the test suite a block is
// one thread, and the reduction is that thread's value.
enum { SG_RED_SUM, SG_RED_MIN, SG_RED_MAX };

template <int OP, class V>
SG_FN V sg_combine(V a, V b)
{
    return OP == SG_RED_SUM ? a + b : OP == SG_RED_MIN ? (b < a ? b : a) : (b > a ? b : a);
}

#ifdef __CUDACC__
template <int OP, class V>
__device__ __forceinline__ V sg_block_reduce(V v, V identity)
{
    __shared__ V part[32];
    for (int o = 16; o > 0; o >>= 1) v = sg_combine<OP>(v, __shfl_down_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    __syncthreads();  // the previous reduction's reads of part are done
    if (lane == 0) part[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < (int)((blockDim.x + 31) >> 5) ? part[lane] : identity;
        for (int o = 16; o > 0; o >>= 1)
            v = sg_combine<OP>(v, __shfl_down_sync(0xffffffffu, v, o));
    }
    return v;
}
#else
template <int OP, class V>
SG_FN V sg_block_reduce(V v, V) { return v; }
#endif

// Sums over a row's blocks that do not depend on the order the blocks run in (a GPU runs
// them in any order; float atomics would add the blocks' sums in that order, and a sum
// rounds differently in another): every thread of every block of the row calls it with its
// own N partial sums v. The block reduces them (a fixed tree), stores them at its slot of
// `part` (slot blockIdx.x, N doubles) and counts itself done in the row's counter `done`;
// the row's last block to finish adds the row's slots in block order (thread t those of
// blocks t, t + blockDim.x, ..., then the same fixed tree) into out[0..N). So the row's
// sums are the same bits whatever the order, on every run. The counter wraps back to 0
// (atomicInc), so a launch can run again on the same tables. Every block of the row must
// call it, idle ones included (with zeros): a block that leaves before it would leave the
// row's sums unwritten. (The slots are read past L1, __ldcg: another row's last block on
// the same SM may have cached a line of them before this row's blocks wrote theirs.)
template <int N>
SG_FN void sg_row_sums(double (&v)[N], int sg_b, int sg_nb, double* __restrict__ part,
                       unsigned int* __restrict__ done, double* __restrict__ out)
{
    __shared__ int sg_last;
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = sg_block_reduce<SG_RED_SUM>(v[i], 0.0);
    if (threadIdx.x == 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) part[(long long)blockIdx.x * N + i] = v[i];
        __threadfence();  // the slot before the count: the last block reads it
        const bool last = atomicInc(done, (unsigned int)(sg_nb - 1)) == (unsigned int)(sg_nb - 1);
        if (last) __threadfence();  // (acquire: the count, then the other blocks' slots)
        sg_last = last;
    }
    __syncthreads();
    if (!sg_last) return;
    __threadfence();  // (and for every thread of the last block, past the barrier)
    const long long first = (long long)blockIdx.x - sg_b;
    double s[N];
#pragma unroll
    for (int i = 0; i < N; ++i) s[i] = 0.0;
    for (int b = threadIdx.x; b < sg_nb; b += blockDim.x) {
#pragma unroll
        for (int i = 0; i < N; ++i) s[i] += __ldcg(part + (first + b) * N + i);
    }
#pragma unroll
    for (int i = 0; i < N; ++i) s[i] = sg_block_reduce<SG_RED_SUM>(s[i], 0.0);
    if (threadIdx.x == 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = s[i];
    }
}

// Phase A, step 0: the B-spline weight rows of each tumor's box, axis by axis (n0, n1, n2
// rows of g weights, consecutive from W0; W1 and W2 point into the same run): element t is
// one row, from the voxel's position (index - centre) * spacing mm and the control grid's
// extent, as rendering._shape_inputs computes them on the host.
extern "C" __global__ void sg_seg_weights(const int* __restrict__ S, int nS,
                                          const long long* __restrict__ T, int F,
                                          const double* __restrict__ TD, int FD)
{
    SG_SEG_BEGIN;
    const long long* r = T + (long long)sg_s * F;
    const double* rd = TD + (long long)sg_s * FD;
    const long long n0 = r[SG_N0], n1 = r[SG_N1], n2 = r[SG_N2];
    const int g = (int)r[SG_G0];
    const double* pre = (const double*)r[SG_PRE];
    float* w = (float*)r[SG_W0];
    SG_SEG_LOOP(n0 + n1 + n2) {
        long long q;
        const int a = sg_axis_of(t, n0, n1, &q);
        const double ext = rd[SG_D_EXT0 + a];
        const double scale = (double)(g - 1) / (2.0 * ext);
        const double pos = sg_pos(r[SG_O0 + a] + q - r[SG_C0 + a], rd[SG_D_SP0 + a]);
        sg_bspline_row((pos + ext) * scale, g, pre, w + t * g);
    }
}

// Phase A, step 1: the (i, j) part of the deformed-ellipsoid test, once per row of each
// tumor's box (sg_shape_row into the ROWS buffer, 3 + 3 g2 floats a row).
extern "C" __global__ void sg_seg_rows(const int* __restrict__ S, int nS,
                                       const long long* __restrict__ T, int F,
                                       const double* __restrict__ TD, int FD)
{
    SG_SEG_BEGIN;
    const long long* r = T + (long long)sg_s * F;
    const double* rd = TD + (long long)sg_s * FD;
    int n0 = (int)r[SG_N0], n1 = (int)r[SG_N1];
    const float* ctrl = (const float*)r[SG_CTRL];
    int g0 = (int)r[SG_G0], g1 = (int)r[SG_G1], g2 = (int)r[SG_G2];
    const float* w0 = (const float*)r[SG_W0];
    const float* w1 = (const float*)r[SG_W1];
    const double* m = rd + SG_D_M;
    float* rows = (float*)r[SG_ROWS];
    const long long p0 = r[SG_O0] - r[SG_C0], p1 = r[SG_O1] - r[SG_C1];
    const double sp0 = rd[SG_D_SP0], sp1 = rd[SG_D_SP1];
    const int rw = 3 + 3 * g2;
    long long total = (long long)n0 * n1;
    SG_SEG_LOOP(total) {
        int i = (int)(t / n1), j = (int)(t - (long long)i * n1);
        sg_shape_row(ctrl, g0, g1, g2, w0 + i * g0, w1 + j * g1, sg_pos_f32(p0 + i, sp0),
                     sg_pos_f32(p1 + j, sp1), m, rows + t * rw);
    }
}

// Phase A, step 2: gather each tumor's box of the image and organ mask (any dtype, any
// strides) into float32 / uint8 buffers and finish the deformed-ellipsoid test there.
// (at most 64 registers: four blocks of 256 threads per SM; ptxas needs no spills for it)
extern "C" __global__ void __launch_bounds__(256, 4)
    sg_seg_shape(const int* __restrict__ S, int nS, const long long* __restrict__ T, int F,
                 const float* __restrict__ TF, int FF, const double* __restrict__ TD, int FD)
{
    SG_SEG_BEGIN;
    const long long* r = T + (long long)sg_s * F;
    const float* rf = TF + (long long)sg_s * FF;
    const double* rd = TD + (long long)sg_s * FD;
    int n0 = (int)r[SG_N0], n1 = (int)r[SG_N1], n2 = (int)r[SG_N2];
    const int g2 = (int)r[SG_G2], rw = 3 + 3 * g2;
    const float* w2 = (const float*)r[SG_W2];
    const float* rows = (const float*)r[SG_ROWS];
    const double* m = rd + SG_D_M;
    const void* img = (const void*)r[SG_IMG];
    const void* org = (const void*)r[SG_ORG];
    float* orig = (float*)r[SG_ORIG];
    unsigned char* organ = (unsigned char*)r[SG_ORGAN];
    unsigned char* mask = (unsigned char*)r[SG_MASK];
    float tlo = rf[SG_F_TLO], thi = rf[SG_F_THI];
    int clip = (int)r[SG_CLIP];
    float* q2out = (float*)r[SG_Q2];
    // the row's values in registers (the stores could alias the tables)
    const int img_code = (int)r[SG_IMG_CODE], org_code = (int)r[SG_ORG_CODE];
    const long long is0 = r[SG_IS0], is1 = r[SG_IS1], is2 = r[SG_IS2];
    const long long os0 = r[SG_OS0], os1 = r[SG_OS1], os2 = r[SG_OS2];
    const long long o0 = r[SG_O0], o1 = r[SG_O1], o2 = r[SG_O2];
    const long long p2 = o2 - r[SG_C2];
    const double sp2 = rd[SG_D_SP2];
    long long total = (long long)n0 * n1 * n2;
    SG_SEG_LOOP_ILP(total) {
        float vs[SG_ILP];
        unsigned char gs[SG_ILP];
        int is[SG_ILP], js[SG_ILP], ks[SG_ILP];
#pragma unroll
        for (int u = 0; u < SG_ILP; ++u) {  // the image and organ loads of all elements first
            if (SG_ILP_T(u) < total) {
                sg_unravel3(SG_ILP_T(u), n1, n2, &is[u], &js[u], &ks[u]);
                long long gi = is0 * (o0 + is[u]) + is1 * (o1 + js[u]) + is2 * (o2 + ks[u]);
                long long go = os0 * (o0 + is[u]) + os1 * (o1 + js[u]) + os2 * (o2 + ks[u]);
                vs[u] = sg_load_f32(img, img_code, gi);
                gs[u] = sg_load_bin(org, org_code, go);
            }
        }
#pragma unroll
        for (int u = 0; u < SG_ILP; ++u) {
            const long long t = SG_ILP_T(u);
            if (t >= total) break;
            const int i = is[u], j = js[u], k = ks[u];
            float v = vs[u];
            unsigned char o = gs[u];
            orig[t] = v;
            organ[t] = o;
            float q2 = sg_shape_q2_row(rows + ((long long)i * n1 + j) * rw, g2, w2 + k * g2,
                                       sg_pos_f32(p2 + k, sp2), m);
            mask[t] = (unsigned char)((q2 <= 1.0f) && (!clip || o) && v >= tlo && v <= thi);
            if (q2out) q2out[t] = q2;  // the appearance modes of the blend read it
        }
    }
}

// Bounding box and voxel count of each segment's mask: out row s = (lo0, hi0, lo1, hi1,
// lo2, hi2, count), initialised by the caller to (n0, -1, n1, -1, n2, -1, 0).
extern "C" __global__ void sg_seg_bbox(const int* __restrict__ S, int nS,
                                       const long long* __restrict__ T, int F,
                                       int* __restrict__ out)
{
    SG_SEG_BEGIN;
    const long long* r = T + (long long)sg_s * F;
    int n0 = (int)r[SG_N0], n1 = (int)r[SG_N1], n2 = (int)r[SG_N2];
    const unsigned char* mask = (const unsigned char*)r[SG_MASK];
    int* o = out + 7 * (long long)sg_s;
    int lo0 = n0, hi0 = -1, lo1 = n1, hi1 = -1, lo2 = n2, hi2 = -1, count = 0;
    long long total = (long long)n0 * n1 * n2;
    SG_SEG_IDLE(total, 1);
    SG_SEG_LOOP(total) {
        if (!mask[t]) continue;
        int i, j, k;
        sg_unravel3(t, n1, n2, &i, &j, &k);
        lo0 = i < lo0 ? i : lo0; hi0 = i > hi0 ? i : hi0;
        lo1 = j < lo1 ? j : lo1; hi1 = j > hi1 ? j : hi1;
        lo2 = k < lo2 ? k : lo2; hi2 = k > hi2 ? k : hi2;
        ++count;
    }
    lo0 = sg_block_reduce<SG_RED_MIN>(lo0, n0); hi0 = sg_block_reduce<SG_RED_MAX>(hi0, -1);
    lo1 = sg_block_reduce<SG_RED_MIN>(lo1, n1); hi1 = sg_block_reduce<SG_RED_MAX>(hi1, -1);
    lo2 = sg_block_reduce<SG_RED_MIN>(lo2, n2); hi2 = sg_block_reduce<SG_RED_MAX>(hi2, -1);
    count = sg_block_reduce<SG_RED_SUM>(count, 0);
    if (threadIdx.x != 0 || count == 0) return;
    atomicMin(&o[0], lo0); atomicMax(&o[1], hi0);
    atomicMin(&o[2], lo1); atomicMax(&o[3], hi1);
    atomicMin(&o[4], lo2); atomicMax(&o[5], hi2);
    atomicAdd(&o[6], count);
}

// Phase B, step 1: the tight box (a sub-box of the phase-A box) of orig, organ and mask into
// contiguous buffers (the mask blur's first pass reads the mask's bytes; the blend writes
// every element of its change buffer).
SG_FN void sg_step_gather(int sg_s, int sg_b, int sg_nb, const long long* __restrict__ T, int F)
{
    const long long* r = T + (long long)sg_s * F;
    if (r[SG_KIND]) return;
    const float* q2 = (const float*)r[SG_Q2];
    float* tq2 = (float*)r[SG_TQ2];
    int m0 = (int)r[SG_TN0], m1 = (int)r[SG_TN1], m2 = (int)r[SG_TN2];
    int N1 = (int)r[SG_N1], N2 = (int)r[SG_N2];
    const float* orig = (const float*)r[SG_ORIG];
    const unsigned char* organ = (const unsigned char*)r[SG_ORGAN];
    const unsigned char* mask = (const unsigned char*)r[SG_MASK];
    float* torig = (float*)r[SG_TORIG];
    unsigned char* torgan = (unsigned char*)r[SG_TORGAN];
    unsigned char* tmask = (unsigned char*)r[SG_TMASK];
    const long long u0 = r[SG_U0], u1 = r[SG_U1], u2 = r[SG_U2];  // in registers
    long long total = (long long)m0 * m1 * m2;
    SG_SEG_LOOP(total) {
        int i, j, k;
        sg_unravel3(t, m1, m2, &i, &j, &k);
        long long s = ((u0 + i) * N1 + (u1 + j)) * N2 + (u2 + k);
        torig[t] = orig[s];
        torgan[t] = organ[s];
        tmask[t] = mask[s];
        if (tq2) tq2[t] = q2[s];
    }
}

extern "C" __global__ void sg_seg_gather(const int* __restrict__ S, int nS,
                                         const long long* __restrict__ T, int F)
{
    SG_SEG_BEGIN;
    sg_step_gather(sg_s, sg_b, sg_nb, T, F);
}

// A separable pass along `axis` of an input (n0, n1, n2) into an output (o0, o1, o2): output
// element t reads the input line through it, returned as its first element, with the line's
// stride and t's index o along the axis.
template <class In>
SG_FN const In* sg_pass_line(const In* in, long long t, int axis, int n1, int n2, int o1, int o2,
                             long long* stride, int* o) {
    int a, b, c;
    sg_unravel3(t, o1, o2, &a, &b, &c);
    if (axis == 2) {
        *stride = 1; *o = c;
        return in + ((long long)a * n1 + b) * n2;
    }
    if (axis == 1) {
        *stride = n2; *o = b;
        return in + (long long)a * n1 * n2 + c;
    }
    *stride = (long long)n1 * n2; *o = a;
    return in + (long long)b * n2 + c;
}

// One banded contraction pass along `axis` for every segment: the input (d0, d1, d2) at
// address column c_in, its sizes at columns c_dim.. c_dim+2, the band (start int64 rows,
// float32 weights (m, K)) at c_s / c_w with m at c_m and K at c_k; the output at c_out.
SG_FN void sg_step_band(int sg_s, int sg_b, int sg_nb, const long long* __restrict__ T, int F,
                        int axis, int c_in, int c_dim, int c_s, int c_w, int c_m, int c_k,
                        int c_out)
{
    const long long* r = T + (long long)sg_s * F;
    if (r[SG_KIND]) return;
    int n0 = (int)r[c_dim], n1 = (int)r[c_dim + 1], n2 = (int)r[c_dim + 2];
    int m = (int)r[c_m], K = (int)r[c_k];
    const float* in = (const float*)r[c_in];
    float* out = (float*)r[c_out];
    const long long* s = (const long long*)r[c_s];
    const float* w = (const float*)r[c_w];
    int o0 = axis == 0 ? m : n0, o1 = axis == 1 ? m : n1, o2 = axis == 2 ? m : n2;
    long long total = (long long)o0 * o1 * o2;
    SG_SEG_LOOP(total) {
        long long stride;
        int o;
        const float* in0 = sg_pass_line(in, t, axis, n1, n2, o1, o2, &stride, &o);
        out[t] = sg_band_point(in0, stride, s, w, K, o);
    }
}

extern "C" __global__ void sg_seg_band(const int* __restrict__ S, int nS,
                                       const long long* __restrict__ T, int F, int axis, int c_in,
                                       int c_dim, int c_s, int c_w, int c_m, int c_k, int c_out)
{
    SG_SEG_BEGIN;
    sg_step_band(sg_s, sg_b, sg_nb, T, F, axis, c_in, c_dim, c_s, c_w, c_m, c_k, c_out);
}

// The texture rescale's statistics of one thread's grid values (sum of those above the
// threshold, their count, sum of all), in the order the thread adds them; sg_tex_put
// combines the row's (every thread of every block of the row calls it: sg_row_sums) into
// its statistics o.
struct sg_tex_sums {
    double above, cnt, all;
};

SG_FN void sg_tex_add(sg_tex_sums* s, float v, float thr)
{
    s->all += (double)v;
    if (v > thr) { s->above += (double)v; s->cnt += 1.0; }
}

SG_FN void sg_tex_put(sg_tex_sums s, int sg_b, int sg_nb, double* part, unsigned int* done,
                      double* o)
{
    double v[3] = {s.above, s.cnt, s.all};
    sg_row_sums<3>(v, sg_b, sg_nb, part, done, o);
}

// The pass's loop over its outputs, for an input of type In (float32; the uint8 tumor mask
// for the mask blur's first pass, each tap read as the float 0 or 1 the mask is).
template <bool STATS, class In>
SG_FN void sg_conv_loop(const In* __restrict__ in, float* __restrict__ out,
                        const float* __restrict__ kern, int K, int kk, long long off, int axis,
                        int n1, int n2, int n_in, int o1, int o2, long long total, int sg_b,
                        int sg_nb, float thr, sg_tex_sums* sums)
{
    SG_SEG_LOOP(total) {
        long long stride;
        int o;
        const In* in0 = sg_pass_line(in, t, axis, n1, n2, o1, o2, &stride, &o);
        long long c0 = o + off;
        long long s = c0 < 0 ? 0 : (c0 > n_in - kk ? n_in - kk : c0);
        const In* src = in0 + s * stride;
        float acc = 0.0f;
        for (int q = 0; q < kk; ++q) {
            long long tap = s + q - c0;
            float w = (tap >= 0 && tap < K) ? kern[tap] : 0.0f;
            acc = acc + w * (float)src[q * stride];
        }
        out[t] = acc;
        if (STATS) sg_tex_add(sums, acc, thr);
    }
}

// One pass of a zero-padded correlation along `axis` for every segment:
// out[o] = sum_t kern[t] in[o + off + t] over the inputs inside the array (the mask blur, with
// off = -radius, and the texture's block-to-grid smoothing). Its band is derived on the fly:
// each output reads a window of min(K, n_in) inputs inside the array, taps outside the kernel
// weighted 0, summed in window order: the very operations of sg_band_point on the band of
// synthgen._geometry.blur_band (the CPU's toeplitz_contract3 skips those zero taps; adding
// them changes no float32 sum of finite values). Input (d0, d1, d2) at column c_in with sizes
// at c_dim.., the kernel's address, length and offset at c_k, c_klen, c_off, the output's
// size along the axis at c_m, the output at c_out.
// STATS: the texture grid's last smoothing pass, which also measures the rescale's statistics
// of its output (sg_seg_tex_stats: the same sums in the same order) into stats row s.
// An input at column SG_TMASK is the tight box's uint8 tumor mask (the mask blur's first
// pass: no float32 copy of the mask written by the gather and read back, 4 bytes a voxel
// each way, and a quarter of the bytes per tap); any other input is float32.
template <bool STATS>
SG_FN void sg_step_conv_t(int sg_s, int sg_b, int sg_nb, const long long* __restrict__ T, int F,
                          const double* __restrict__ TD, int FD, double* __restrict__ stats,
                          double* __restrict__ part, unsigned int* __restrict__ done, int axis,
                          int c_in, int c_dim, int c_k, int c_klen, int c_off, int c_m,
                          int c_out)
{
    const long long* r = T + (long long)sg_s * F;
    if (r[SG_KIND]) return;
    int n0 = (int)r[c_dim], n1 = (int)r[c_dim + 1], n2 = (int)r[c_dim + 2];
    int m = (int)r[c_m], K = (int)r[c_klen];
    long long off = r[c_off];
    float* out = (float*)r[c_out];
    const float* kern = (const float*)r[c_k];
    int n_in = axis == 0 ? n0 : (axis == 1 ? n1 : n2);
    int kk = K < n_in ? K : n_in;
    int o0 = axis == 0 ? m : n0, o1 = axis == 1 ? m : n1, o2 = axis == 2 ? m : n2;
    long long total = (long long)o0 * o1 * o2;
    const float thr = STATS ? (float)TD[(long long)sg_s * FD + SG_D_THR] : 0.0f;
    // (no early exit for an idle block: with STATS it counts itself done, sg_row_sums)
    sg_tex_sums sums = {0.0, 0.0, 0.0};
    if (!STATS && c_in == SG_TMASK)
        sg_conv_loop<false>((const unsigned char*)r[c_in], out, kern, K, kk, off, axis, n1, n2,
                            n_in, o1, o2, total, sg_b, sg_nb, thr, &sums);
    else
        sg_conv_loop<STATS>((const float*)r[c_in], out, kern, K, kk, off, axis, n1, n2, n_in,
                            o1, o2, total, sg_b, sg_nb, thr, &sums);
    if (STATS) sg_tex_put(sums, sg_b, sg_nb, part, done + sg_s, stats + 3 * (long long)sg_s);
}

SG_FN void sg_step_conv(int sg_s, int sg_b, int sg_nb, const long long* __restrict__ T, int F,
                        int axis, int c_in, int c_dim, int c_k, int c_klen, int c_off, int c_m,
                        int c_out)
{
    sg_step_conv_t<false>(sg_s, sg_b, sg_nb, T, F, 0, 0, 0, 0, 0, axis, c_in, c_dim, c_k,
                          c_klen, c_off, c_m, c_out);
}

extern "C" __global__ void sg_seg_conv(const int* __restrict__ S, int nS,
                                       const long long* __restrict__ T, int F, int axis, int c_in,
                                       int c_dim, int c_k, int c_klen, int c_off, int c_m,
                                       int c_out)
{
    SG_SEG_BEGIN;
    sg_step_conv(sg_s, sg_b, sg_nb, T, F, axis, c_in, c_dim, c_k, c_klen, c_off, c_m, c_out);
}

// Lattice noise of every segment's texture (as sg_lattice_uniform).
SG_FN void sg_step_lattice(int sg_s, int sg_b, int sg_nb, const long long* __restrict__ T, int F)
{
    const long long* r = T + (long long)sg_s * F;
    if (r[SG_KIND]) return;
    int n0 = (int)r[SG_LN0], n1 = (int)r[SG_LN1], n2 = (int)r[SG_LN2];
    int a0 = (int)r[SG_LA0], a1 = (int)r[SG_LA1], a2 = (int)r[SG_LA2];
    sg_u32 k0 = (sg_u32)r[SG_NK0], k1 = (sg_u32)r[SG_NK1];
    float* out = (float*)r[SG_NOISE];
    long long total = (long long)n0 * n1 * n2;
    SG_SEG_LOOP(total) {
        int i, j, k;
        sg_unravel3(t, n1, n2, &i, &j, &k);
        out[t] = sg_uniform(k0, k1, sg_lattice_index(a0 + i, a1 + j, a2 + k)) - 0.5f;
    }
}

extern "C" __global__ void sg_seg_lattice(const int* __restrict__ S, int nS,
                                          const long long* __restrict__ T, int F)
{
    SG_SEG_BEGIN;
    sg_step_lattice(sg_s, sg_b, sg_nb, T, F);
}

// Bernoulli block fractions of every segment (as sg_block_sums).
extern "C" __global__ void sg_seg_blocks(const int* __restrict__ S, int nS,
                                         const long long* __restrict__ T, int F,
                                         const double* __restrict__ TD, int FD)
{
    SG_SEG_BEGIN;
    const long long* r = T + (long long)sg_s * F;
    if (r[SG_KIND]) return;
    const double* rd = TD + (long long)sg_s * FD;
    int nx = (int)r[SG_B0], ny = (int)r[SG_B1], nz = (int)r[SG_B2];
    const float* z = (const float*)r[SG_Z0];
    const double* in0 = (const double*)r[SG_INV0];
    const double* in1 = (const double*)r[SG_INV1];
    const double* in2 = (const double*)r[SG_INV2];
    float* out = (float*)r[SG_FRAC];
    double inv_n = 1.0 / rd[SG_D_NCELLS];
    long long total = (long long)nx * ny * nz;
    SG_SEG_LOOP(total) {
        int i, j, k;
        sg_unravel3(t, ny, nz, &i, &j, &k);
        double nij = rd[SG_D_ZSCALE] * in0[i] * in1[j];
        out[t] = sg_block_fraction(z[t], nij, in2[k], rd[SG_D_BASE], rd[SG_D_SCALE],
                                   (sg_u32)r[SG_BK0], (sg_u32)r[SG_BK1], (int)r[SG_BLK0] + i,
                                   (int)r[SG_BLK1] + j, (int)r[SG_BLK2] + k, inv_n);
    }
}

// The published rescale, measured per segment: stats row s += (sum of g over g > threshold,
// their count, sum of all g); then g = clip(g * u0 / mean, 0, 1) (mean of all when none is
// above; unchanged when the mean is not positive).
extern "C" __global__ void sg_seg_tex_stats(const int* __restrict__ S, int nS,
                                            const long long* __restrict__ T, int F,
                                            const double* __restrict__ TD, int FD,
                                            double* __restrict__ stats,
                                            double* __restrict__ part,
                                            unsigned int* __restrict__ done)
{
    SG_SEG_BEGIN;
    const long long* r = T + (long long)sg_s * F;
    if (r[SG_KIND]) return;
    const double* rd = TD + (long long)sg_s * FD;
    const float* g = (const float*)r[SG_GRID];
    float thr = (float)rd[SG_D_THR];
    long long total = (long long)r[SG_G_0] * r[SG_G_1] * r[SG_G_2];
    sg_tex_sums sums = {0.0, 0.0, 0.0};  // (an idle block too: it counts itself done)
    SG_SEG_LOOP(total) sg_tex_add(&sums, g[t], thr);
    sg_tex_put(sums, sg_b, sg_nb, part, done + sg_s, stats + 3 * (long long)sg_s);
}

// Row r's rescale factor u0 / mean from its statistics o (sg_seg_tex_stats'; rd: its float64
// row): 1 when the mean is not positive.
SG_FN float sg_rescale_factor(const long long* __restrict__ r, const double* __restrict__ rd,
                              const double* __restrict__ o)
{
    const long long total = (long long)r[SG_G_0] * r[SG_G_1] * r[SG_G_2];
    double mean = o[1] > 0.0 ? o[0] / o[1] : o[2] / (double)total;
    return mean > 0.0 ? (float)(rd[SG_D_U0] / mean) : 1.0f;
}

extern "C" __global__ void sg_seg_tex_scale(const int* __restrict__ S, int nS,
                                            const long long* __restrict__ T, int F,
                                            const double* __restrict__ TD, int FD,
                                            const double* __restrict__ stats)
{
    SG_SEG_BEGIN;
    const long long* r = T + (long long)sg_s * F;
    if (r[SG_KIND]) return;
    float* g = (float*)r[SG_GRID];
    long long total = (long long)r[SG_G_0] * r[SG_G_1] * r[SG_G_2];
    const float fac = sg_rescale_factor(r, TD + (long long)sg_s * FD, stats + 3 * (long long)sg_s);
    SG_SEG_LOOP(total) g[t] = sg_rescaled(g[t], fac);
}

// Phase B: the blend's trilinear texture coordinates. Per index k of the tight box's last axis
// (elements t < n2), its base index and fraction on the texture grid, from the voxel's
// position (index - centre) * spacing mm and the grid's origin and step: the CPU path's
// interp_coords table, the same float64 operations (sg_interp), which the blend would
// otherwise redo for every voxel it reaches. Then per (i, j) of the box's first two axes
// (the elements past those, i-major), the bilinear weights of the grid's four rows
// (sg_bilinear of the two axes' sg_interp fractions: the CPU blend's w00..w11) and the first
// row's offset in the grid: the blend reads them (five words, the same for every voxel of a
// grid row, so mostly one load a warp) instead of making them per voxel (six float64
// conversions, four products and the offset's arithmetic). Layout at SG_INTERP:
// segmented.cuh.
SG_FN void sg_step_interp(int sg_s, int sg_b, int sg_nb, const long long* __restrict__ T, int F,
                          const double* __restrict__ TD, int FD)
{
    const long long* r = T + (long long)sg_s * F;
    if (r[SG_KIND]) return;
    const double* rd = TD + (long long)sg_s * FD;
    const long long n0 = r[SG_TN0], n1 = r[SG_TN1], n2 = r[SG_TN2];
    int* ixs = (int*)r[SG_INTERP];
    float* fxs = (float*)(ixs + n2);
    float* wij = fxs + n2;
    int* oij = (int*)(wij + 4 * n0 * n1);
    SG_SEG_LOOP(n2 + n0 * n1) {
        int a0, a1;
        if (t < n2) {
            fxs[t] = sg_interp(sg_pos(r[SG_TO2] + t - r[SG_C2], rd[SG_D_SP2]), rd[SG_D_TX2],
                               rd[SG_D_STEP], (int)r[SG_G_2], &a0);
            ixs[t] = a0;
        } else {
            const long long e = t - n2;  // (n1 > 0 here: there are n0 * n1 such elements)
            const long long i = e / n1, j = e - i * n1;
            const float u0 = sg_interp(sg_pos(r[SG_TO0] + i - r[SG_C0], rd[SG_D_SP0]),
                                       rd[SG_D_TX0], rd[SG_D_STEP], (int)r[SG_G_0], &a0);
            const float u1 = sg_interp(sg_pos(r[SG_TO1] + j - r[SG_C1], rd[SG_D_SP1]),
                                       rd[SG_D_TX1], rd[SG_D_STEP], (int)r[SG_G_1], &a1);
            sg_bilinear(u0, u1, wij + 4 * e);
            oij[e] = (a0 * (int)r[SG_G_1] + a1) * (int)r[SG_G_2];
        }
    }
}

extern "C" __global__ void sg_seg_interp(const int* __restrict__ S, int nS,
                                         const long long* __restrict__ T, int F,
                                         const double* __restrict__ TD, int FD)
{
    SG_SEG_BEGIN;
    sg_step_interp(sg_s, sg_b, sg_nb, T, F, TD, FD);
}

// Phase B's first launch: the gather, the texture's lattice noise and the blend's texture
// coordinates of every segment (three independent steps).
extern "C" __global__ void sg_seg_first(const int* __restrict__ S, int nR,
                                        const long long* __restrict__ T, int F,
                                        const double* __restrict__ TD, int FD)
{
    SG_STEPS_BEGIN(3);
    if (sg_step == 0)
        sg_step_gather(sg_row, sg_b, sg_nb, T, F);
    else if (sg_step == 1)
        sg_step_lattice(sg_row, sg_b, sg_nb, T, F);
    else
        sg_step_interp(sg_row, sg_b, sg_nb, T, F, TD, FD);
}

// A pass of the mask blur (sg_seg_conv's arguments first) beside a pass of the texture's
// band contraction (sg_seg_band's, b_ prefixed): the two chains do not meet before the blend.
extern "C" __global__ void sg_seg_conv_band(const int* __restrict__ S, int nR,
                                            const long long* __restrict__ T, int F, int axis,
                                            int c_in, int c_dim, int c_k, int c_klen, int c_off,
                                            int c_m, int c_out, int b_axis, int b_in, int b_dim,
                                            int b_s, int b_w, int b_m, int b_k, int b_out)
{
    SG_STEPS_BEGIN(2);
    if (sg_step == 0)
        sg_step_conv(sg_row, sg_b, sg_nb, T, F, axis, c_in, c_dim, c_k, c_klen, c_off, c_m,
                     c_out);
    else
        sg_step_band(sg_row, sg_b, sg_nb, T, F, b_axis, b_in, b_dim, b_s, b_w, b_m, b_k, b_out);
}

// The texture grid's last smoothing pass (sg_seg_conv's arguments) with the rescale's
// statistics of its output (sg_seg_tex_stats) in the same loop.
extern "C" __global__ void sg_seg_conv_stats(const int* __restrict__ S, int nS,
                                             const long long* __restrict__ T, int F,
                                             const double* __restrict__ TD, int FD,
                                             double* __restrict__ stats,
                                             double* __restrict__ part,
                                             unsigned int* __restrict__ done, int axis, int c_in,
                                             int c_dim, int c_k, int c_klen, int c_off, int c_m,
                                             int c_out)
{
    SG_SEG_BEGIN;
    sg_step_conv_t<true>(sg_s, sg_b, sg_nb, T, F, TD, FD, stats, part, done, axis, c_in, c_dim,
                         c_k, c_klen, c_off, c_m, c_out);
}

// The fused blend of every segment into its own change buffer, every element written (0
// where the tumor does not change the voxel; as sg_blend_tumor into a zeroed buffer: a
// zeroing pass before it wrote 4 bytes a voxel more than the zeros written here). It reads
// the texture grid as sg_seg_tex_scale left it, rescaled in place. (Rescaling each grid value
// as it was read, which saved that launch, cost three instructions a value, eight values a
// voxel, where the rescale's own pass over the grid, a fraction of the box's size, moves
// about a byte a voxel more: benchmarks/count_sass.py --per-element counts the former,
// gpu_check's bandwidth rows, the blend with and without its rescale, the latter.)
// (at most 64 registers: four blocks of 256 threads per SM; ptxas needs no spills for it)
extern "C" __global__ void __launch_bounds__(256, 4)
    sg_seg_blend(const int* __restrict__ S, int nS, const long long* __restrict__ T, int F,
                 const float* __restrict__ TF, int FF)
{
    SG_SEG_BEGIN;
    const long long* r = T + (long long)sg_s * F;
    if (r[SG_KIND]) return;
    const float* rf = TF + (long long)sg_s * FF;
    int nx = (int)r[SG_TN0], ny = (int)r[SG_TN1], nz = (int)r[SG_TN2];
    const float* orig = (const float*)r[SG_TORIG];
    const unsigned char* organ = (const unsigned char*)r[SG_TORGAN];
    const float* blur = (const float*)r[SG_BLUR];
    const float* tgrid = (const float*)r[SG_GRID];
    int gy = (int)r[SG_G_1], gz = (int)r[SG_G_2];
    // the voxel's texture coordinates (sg_seg_interp's tables: no float64 division, product
    // or conversion per voxel here): along axis 2 per index k, the bilinear weights of the
    // grid rows and the first row's offset per (i, j)
    const int* ixs = (const int*)r[SG_INTERP];
    const float* fxs = (const float*)(ixs + nz);
    const float* wij = fxs + nz;
    const int* oij = (const int*)(wij + 4 * (long long)nx * ny);
    float* delta = (float*)r[SG_DELTA];
    float tlo = rf[SG_F_TLO], thi = rf[SG_F_THI];
    const float* tq2 = (const float*)r[SG_TQ2];
    const float* app = (const float*)r[SG_APP];
    const sg_u32* keys = (const sg_u32*)r[SG_KEYS];
    // the row's values in registers (the stores to delta could alias the tables for all the
    // compiler knows, so it would reload them per voxel)
    const float contrast = rf[SG_F_CONTRAST], organ_hu = rf[SG_F_ORGAN_HU];
    const int clip = (int)r[SG_CLIP];
    const int off0 = (int)r[SG_OFF0], off1 = (int)r[SG_OFF1], off2 = (int)r[SG_OFF2];
    long long total = (long long)nx * ny * nz;
    // the voxel (i, j, k) of the thread's element, advanced with a carry per axis from one
    // element to the next (sg_advance3: by blockDim.x within a step, by the rest of the
    // block-stride between steps), not unravelled by divisions per voxel, nor per step (on
    // the H200 the step's divisions were 8% of the kernel's instructions and the most
    // sampled stall: each waits on the last)
    if (total == 0) return;  // (a box with a side 0: the divisions below would be by 0)
    int si, sj, sk, gi, gj, gk, i, j, k;
    sg_unravel3(blockDim.x, ny, nz, &si, &sj, &sk);
    sg_unravel3(SG_ILP_REST, ny, nz, &gi, &gj, &gk);
    sg_unravel3(SG_ILP_T0, ny, nz, &i, &j, &k);
    SG_SEG_LOOP_ILP(total) {
        float bs[SG_ILP], vs[SG_ILP];
#pragma unroll
        for (int u = 0; u < SG_ILP; ++u) {
            if (SG_ILP_T(u) < total) {
                bs[u] = blur[SG_ILP_T(u)];
                vs[u] = orig[SG_ILP_T(u)];
            }
        }
#pragma unroll
        for (int u = 0; u < SG_ILP; ++u) {
            const long long t = SG_ILP_T(u);
            if (t >= total) break;
            if (u) sg_advance3(&i, &j, &k, si, sj, sk, ny, nz);
            float b = bs[u];
            float v = vs[u];
            float d = 0.0f;
            if (!(b <= 0.0f || v < tlo || v > thi)) {
                const int e = i * ny + j;
                float tex = sg_texture_w(tgrid, oij[e], gy, gz, wij + 4 * e, ixs[k], fxs[k]);
                if (app) {  // appearance modes (rim, necrosis, specks, noise): see blend.cuh
                    int inside = organ[t];
                    if (inside || !clip)
                        d = sg_appear_delta(v, inside, b, tex * contrast, tq2[t], organ_hu, app,
                                            keys, off0 + i, off1 + j, off2 + k);
                } else {
                    d = sg_blend_delta(v, organ[t], b, tex, tlo, thi, contrast, organ_hu, clip);
                }
            }
            // (the row's own buffer, written by this thread alone: the change, or 0 where
            // there is none, as the CPU's zeroed buffer keeps it; a NaN or -0 change is 0)
            delta[t] = fabsf(d) > 0.0f ? d : 0.0f;
        }
        sg_advance3(&i, &j, &k, gi, gj, gk, ny, nz);  // (to the next step's first element)
    }
}

// The stronger of v and a merge partner's change at (a, b, c) of the partner's tight box
// (sizes n0, n1, n2; change buffer d), v where the voxel is outside that box (a negative
// index is a large unsigned one: out of the box too). Of equal magnitudes the larger value,
// so every row of an overlap takes the same value whatever the order, and their writes of
// the voxel agree. (int coordinates: fewer registers than long long)
SG_FN float sg_stronger_at(float v, const float* d, int a, int b, int c, int n0, int n1, int n2)
{
    if ((unsigned)a >= (unsigned)n0 || (unsigned)b >= (unsigned)n1 || (unsigned)c >= (unsigned)n2)
        return v;
    const float w = d[((long long)a * n1 + b) * n2 + c];
    return fabsf(w) > fabsf(v) || (fabsf(w) == fabsf(v) && w > v) ? w : v;
}

// Overlapping tumors: the change v of a segment at voxel (x, y, z) of the scan made the
// strongest among v and the changes of the segment's merge partners (the segments listed at
// SG_PART, in ascending order, whose tight boxes overlap its own) that hold the voxel, read
// from their unmerged buffers (complete: the blend ran before), as the CPU's pairwise merge
// (merge_strongest) does. The write-back calls it per voxel of a segment with partners: no
// merged buffer written by a launch of its own and read back (8 bytes a voxel), one launch
// fewer.
SG_FN float sg_merged_at(float v, const long long* __restrict__ T, int F,
                         const long long* __restrict__ part, int np, int x, int y, int z)
{
    for (int p = 0; p < np; ++p) {
        const long long* q = T + part[p] * F;
        v = sg_stronger_at(v, (const float*)q[SG_DELTA], x - (int)q[SG_TO0], y - (int)q[SG_TO1],
                           z - (int)q[SG_TO2], (int)q[SG_TN0], (int)q[SG_TN1], (int)q[SG_TN2]);
    }
    return v;
}

// The overlapping merge partners of a write-back row, at most SG_PMAX, cached in shared
// memory by sg_overlap_box (in ascending order, as SG_PART lists them): per partner its tight
// box's origin in the row's box and its sizes (six ints at pb), and its change buffer (pd).
// sg_merged_cached is sg_merged_at over them, for a voxel (i, j, k) of the row's box: no
// partner index, table row or 64-bit box arithmetic per voxel (the merge was some 100
// instructions a partner a voxel through the table, a quarter of the write-back's on the
// H200's bandwidth batch). A row with more overlapping partners uses sg_merged_at.
#ifndef SG_PMAX  // (the test suite compiles the host stand-in with 1 too)
#define SG_PMAX 8
#endif
// how a write-back row merges its partners' changes: none (no partners), from the shared
// cache (sg_merged_cached), through the table (sg_merged_at: more than SG_PMAX overlap it).
// Separate loops: with both merges in one, the kernel spilled on sm_90.
#define SG_PART_NONE 0
#define SG_PART_CACHED 1
#define SG_PART_TABLE 2
// sg_step_apply's shared ints (ov): 16, then the cached partners' boxes (their change
// buffers are a shared array of their own, pd)
#define SG_OV_INTS (16 + 6 * SG_PMAX)
SG_FN float sg_merged_cached(float v, int npc, const SG_SHARED_PTR int* pb,
                             const SG_SHARED_PTR long long* pd, int i, int j, int k)
{
    for (int p = 0; p < npc; ++p) {
        const SG_SHARED_PTR int* e = pb + 6 * p;
        v = sg_stronger_at(v, (const float*)pd[p], i - e[0], j - e[1], k - e[2], e[3], e[4],
                           e[5]);
    }
    return v;
}

// Write-back: input - change into the image (any dtype, any strides) where the change is not
// zero, or into a float32 buffer for host-resident images; per-segment tumor statistics
// (voxels, summed change) into stats row s (sg_row_sums, with the slots part_sums and the
// counters done). The change is the segment's own (SG_DELTA), merged with its partners'
// where it has any (sg_merged_at); a segment whose merged change the host reads (a
// host-resident image: which voxels changed) gets it written at SG_MERGED too (0: none).
// The write-back's loop for one destination type D, the value already rounded and clipped to
// its range (the kernel picks D once per segment, outside the loop: a nine-way switch per
// stored voxel took the kernel to 76 registers, 37.5% occupancy; typed loops needed 53, and
// with the merge of the partners' changes 64, so four blocks of 256 threads still fit an SM,
// by ptxas for sm_90 and sm_80; the kernels' launch bounds hold them there). PART: the
// segment has merge partners (np of them, at part; int coordinates: with long long ones the
// merge took the kernel to 72 registers). ov: the shared values of sg_step_apply (the box of
// the overlaps, the walk's steps, the tight box's origin in the scan). dst: the image at the
// tight box's origin.
template <class D, int PART>
SG_FN void sg_apply_loop(D* __restrict__ dst, long long total, int ny, int nz,
                         const float* __restrict__ orig, const float* __restrict__ delta,
                         const unsigned char* __restrict__ mask, float cmin, float cmax,
                         float lo, float hi, int round_int, int ds0, int ds1, int ds2,
                         int sg_b, int sg_nb, const long long* __restrict__ T,
                         int F, const long long* __restrict__ part, int np,
                         const SG_SHARED_PTR int* ov, const SG_SHARED_PTR long long* pd,
                         float* __restrict__ merged, int* n_out, double* acc_out)
{
    int n = 0;
    double acc = 0.0;
    int i = 0, j = 0, k = 0;  // element's voxel, advanced as the blend's (steps: ov[6..12))
    if (total > 0) sg_unravel3(SG_ILP_T0, ny, nz, &i, &j, &k);
    SG_SEG_LOOP_ILP(total) {
        float os[SG_ILP], ds[SG_ILP];
        unsigned char ms[SG_ILP];
#pragma unroll
        for (int u = 0; u < SG_ILP; ++u) {
            if (SG_ILP_T(u) < total) {
                os[u] = orig[SG_ILP_T(u)];
                ds[u] = delta[SG_ILP_T(u)];
                ms[u] = mask[SG_ILP_T(u)];
            }
        }
#pragma unroll
        for (int u = 0; u < SG_ILP; ++u) {
            const long long t = SG_ILP_T(u);
            if (t >= total) break;
            if (u) sg_advance3(&i, &j, &k, ov[6], ov[7], ov[8], ny, nz);
            float o = os[u];
            float d = ds[u];
            float w = o;
            // the partners' changes only inside the box that holds every overlap (ov: its
            // origin and sizes in this box; most of a box with partners is outside it)
            if (PART != SG_PART_NONE && (unsigned)(i - ov[0]) < (unsigned)ov[3] &&
                (unsigned)(j - ov[1]) < (unsigned)ov[4] && (unsigned)(k - ov[2]) < (unsigned)ov[5])
                d = PART == SG_PART_CACHED
                        ? sg_merged_cached(d, ov[15], ov + 16, pd, i, j, k)
                        : sg_merged_at(d, T, F, part, np, ov[12] + i, ov[13] + j, ov[14] + k);
            if (merged) merged[t] = d;
            if (d != 0.0f) {
                w = sg_apply(o, d, cmin, cmax, lo, hi, round_int);
                dst[ds0 * i + ds1 * j + ds2 * k] = (D)w;
            }
            if (ms[u]) {
                ++n;
                acc += (double)(o - w);
            }
        }
        sg_advance3(&i, &j, &k, ov[9], ov[10], ov[11], ny, nz);  // (to the next step's first)
    }
    *n_out = n;
    *acc_out = acc;
}

// The box that holds every voxel a row shares with its merge partners (part, np of them):
// the union of the overlaps of its tight box (origin `to` in the scan, sizes n) with theirs,
// as its origin in the row's box (ov[0..3)) and sizes (ov[3..6)); sizes 0 where none
// overlaps. The write-back looks up the partners' changes inside it only: in a batch of large
// liver tumors 79% of the voxels are in boxes with partners, 34% inside this box
// (benchmarks/count_lanes.py --plans 48). It also caches the overlapping partners for
// sg_merged_cached (pb, pd; *npc of them, -1 where more than SG_PMAX overlap).
// (not inlined: thread 0 calls it once a block; inlined, it took the write-back's loops on
// sm_90 past their 64 registers, 8 bytes spilled)
#ifdef __CUDACC__
__device__ __noinline__
#else
static
#endif
void sg_overlap_box(const long long* __restrict__ T, int F,
                          const long long* __restrict__ part, int np, const int (&to)[3],
                          const int (&n)[3], int* ov, SG_SHARED_PTR int* pb,
                          SG_SHARED_PTR long long* pd, int* npc)
{
    int lo[3] = {n[0], n[1], n[2]}, hi[3] = {0, 0, 0};
    int c = 0;  // the overlapping partners cached (sg_merged_cached); -1: more than SG_PMAX
    for (int p = 0; p < np; ++p) {
        const long long* q = T + part[p] * F;
        int a[3], b[3], o[3];
        bool any = true;
        for (int x = 0; x < 3; ++x) {
            o[x] = (int)q[SG_TO0 + x] - to[x];
            a[x] = o[x] > 0 ? o[x] : 0;
            const int e = o[x] + (int)q[SG_TN0 + x];
            b[x] = e < n[x] ? e : n[x];
            any = any && b[x] > a[x];
        }
        if (!any) continue;
        for (int x = 0; x < 3; ++x) {
            lo[x] = a[x] < lo[x] ? a[x] : lo[x];
            hi[x] = b[x] > hi[x] ? b[x] : hi[x];
        }
        if (c >= 0 && c < SG_PMAX) {
            for (int x = 0; x < 3; ++x) {
                pb[6 * c + x] = o[x];
                pb[6 * c + 3 + x] = (int)q[SG_TN0 + x];
            }
            pd[c] = q[SG_DELTA];
            ++c;
        } else {
            c = -1;
        }
    }
    *npc = c;
    for (int x = 0; x < 3; ++x) {
        ov[x] = lo[x];
        ov[3 + x] = hi[x] > lo[x] ? hi[x] - lo[x] : 0;
    }
}

SG_FN void sg_step_apply(int sg_s, int sg_b, int sg_nb, const long long* __restrict__ T, int F,
                         const float* __restrict__ TF, int FF, double* __restrict__ stats,
                         double* __restrict__ part_sums, unsigned int* __restrict__ done)
{
    const long long* r = T + (long long)sg_s * F;
    const float* rf = TF + (long long)sg_s * FF;
    int nx = (int)r[SG_TN0], ny = (int)r[SG_TN1], nz = (int)r[SG_TN2];
    const float* orig = (const float*)r[SG_TORIG];
    const float* delta = (const float*)r[SG_DELTA];
    float* merged = (float*)r[SG_MERGED];
    const long long* part = (const long long*)r[SG_PART];
    const int np = (int)r[SG_NPART];
    const unsigned char* mask = (const unsigned char*)r[SG_TMASK];
    void* dst = (void*)r[SG_DST];
    int code = (int)r[SG_DST_CODE];
    int round_int = (int)r[SG_ROUND];
    // the row's values in registers (the image stores could alias the tables)
    const float cmin = rf[SG_F_CMIN], cmax = rf[SG_F_CMAX], lo = rf[SG_F_LO], hi = rf[SG_F_HI];
    // the image's strides in 32 bits: a voxel's offset from the tight box's origin fits
    // (phase_b_nb refuses a row whose box spans 2^31 elements or more); the origin's offset
    // in 64 (a scan may hold more)
    const int ds0 = (int)r[SG_DS0], ds1 = (int)r[SG_DS1], ds2 = (int)r[SG_DS2];
    const long long dbase =
        r[SG_DS0] * r[SG_DO0] + r[SG_DS1] * r[SG_DO1] + r[SG_DS2] * r[SG_DO2];
    const int to0 = (int)r[SG_TO0], to1 = (int)r[SG_TO1], to2 = (int)r[SG_TO2];
    long long total = (long long)nx * ny * nz;
    int n = 0;  // (an idle block too runs on: it counts itself done in sg_row_sums)
    double acc = 0.0;
    // the box of the overlaps with the partners (ov[0..6)) and the walk's steps per axis,
    // between a thread's elements of a step (blockDim.x: ov[6..9)) and from a step's last
    // to the next's first (ov[9..12)), and the tight box's origin in the scan (ov[12..15)), in
    // shared memory, written by thread 0 (in registers they took the kernel past its 64
    // registers: up to 288 bytes spilled on sm_90)
    // (ov[15]: how many overlapping partners sg_overlap_box cached, from ov[16] and in pd;
    // -1: more than SG_PMAX, merged through the table)
    __shared__ int ov[SG_OV_INTS];
    __shared__ long long pd[SG_PMAX];
    if (threadIdx.x == 0) {
        int w[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, to0, to1, to2, 0};
        if (np) sg_overlap_box(T, F, part, np, {to0, to1, to2}, {nx, ny, nz}, w, ov + 16, pd,
                               &w[15]);
        if (total > 0) {  // (an empty box: no divisions by its 0 side; the block still counts)
            sg_unravel3(blockDim.x, ny, nz, &w[6], &w[7], &w[8]);
            sg_unravel3(SG_ILP_REST, ny, nz, &w[9], &w[10], &w[11]);
        }
        for (int x = 0; x < 16; ++x) ov[x] = w[x];
    }
    __syncthreads();
#define SG_APPLY_AS(D)                                                                        \
    if (np == 0)                                                                              \
        sg_apply_loop<D, SG_PART_NONE>((D*)dst + dbase, total, ny, nz, orig, delta, mask,     \
                                       cmin, cmax, lo, hi, round_int, ds0, ds1, ds2, sg_b,    \
                                       sg_nb, T, F, part, 0, ov, pd, merged, &n, &acc);           \
    else if (ov[15] >= 0)                                                                     \
        sg_apply_loop<D, SG_PART_CACHED>((D*)dst + dbase, total, ny, nz, orig, delta, mask,   \
                                         cmin, cmax, lo, hi, round_int, ds0, ds1, ds2, sg_b,  \
                                         sg_nb, T, F, part, np, ov, pd, merged, &n, &acc);        \
    else                                                                                      \
        sg_apply_loop<D, SG_PART_TABLE>((D*)dst + dbase, total, ny, nz, orig, delta, mask,    \
                                        cmin, cmax, lo, hi, round_int, ds0, ds1, ds2, sg_b,   \
                                        sg_nb, T, F, part, np, ov, pd, merged, &n, &acc)
    SG_AS_CODE(code, SG_APPLY_AS);
#undef SG_APPLY_AS
    double v[2] = {(double)n, acc};
    sg_row_sums<2>(v, sg_b, sg_nb, part_sums, done + sg_s, stats + 2 * (long long)sg_s);
}

extern "C" __global__ void __launch_bounds__(256, 4)
    sg_seg_apply(const int* __restrict__ S, int nS, const long long* __restrict__ T, int F,
                 const float* __restrict__ TF, int FF, double* __restrict__ stats,
                 double* __restrict__ part, unsigned int* __restrict__ done)
{
    SG_SEG_BEGIN;
    sg_step_apply(sg_s, sg_b, sg_nb, T, F, TF, FF, stats, part, done);
}

// The label write: the caller's label map (any dtype, any strides, on the device) gets the
// row's value on every voxel of the row's tumor mask, in the tight box. Rows without one
// (SG_LBL 0) leave at once. Overlapping tumors write the same value, so their order does
// not matter; the result is the CPU's `label[box][mask] = value` per tumor.
SG_FN void sg_step_label(int sg_s, int sg_b, int sg_nb, const long long* __restrict__ T, int F)
{
    const long long* r = T + (long long)sg_s * F;
    void* lab = (void*)r[SG_LBL];
    if (lab == 0) return;
    int nx = (int)r[SG_TN0], ny = (int)r[SG_TN1], nz = (int)r[SG_TN2];
    const unsigned char* mask = (const unsigned char*)r[SG_TMASK];
    const int code = (int)r[SG_LBL_CODE];
    const long long value = r[SG_LBL_VAL];
    const long long s0 = r[SG_LBLS0], s1 = r[SG_LBLS1], s2 = r[SG_LBLS2];
    const long long base = s0 * r[SG_TO0] + s1 * r[SG_TO1] + s2 * r[SG_TO2];
    long long total = (long long)nx * ny * nz;
    SG_SEG_LOOP(total) {
        if (!mask[t]) continue;
        int i, j, k;
        sg_unravel3(t, ny, nz, &i, &j, &k);
        sg_store_label(lab, code, base + s0 * i + s1 * j + s2 * k, value);
    }
}

extern "C" __global__ void sg_seg_label(const int* __restrict__ S, int nS,
                                        const long long* __restrict__ T, int F)
{
    SG_SEG_BEGIN;
    sg_step_label(sg_s, sg_b, sg_nb, T, F);
}

// The write-back beside the label write (a render that writes label maps on the device).
extern "C" __global__ void __launch_bounds__(256, 4)
    sg_seg_apply_label(const int* __restrict__ S, int nR, const long long* __restrict__ T,
                       int F, const float* __restrict__ TF, int FF, double* __restrict__ stats,
                       double* __restrict__ part, unsigned int* __restrict__ done)
{
    SG_STEPS_BEGIN(2);
    if (sg_step == 0)
        sg_step_apply(sg_row, sg_b, sg_nb, T, F, TF, FF, stats, part, done);
    else
        sg_step_label(sg_row, sg_b, sg_nb, T, F);
}
