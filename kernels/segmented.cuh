// Column numbers of the segment tables of segmented.cu (the Python driver parses the
// "#define SG_<NAME> <number>" lines of this file), and typed loads/stores of image voxels.
#pragma once
#include "hash.cuh"

// A pointer parameter to __shared__ memory: the host stand-ins' __shared__ variables are
// volatile statics (the SIMT stand-in, which defines __CUDACC__, defines this to volatile).
#ifndef SG_SHARED_PTR
#ifdef __CUDACC__
#define SG_SHARED_PTR
#else
#define SG_SHARED_PTR volatile
#endif
#endif

// ---- int64 table T: sizes, indices, addresses ------------------------------------------
// phase A: the conservative box (dims, origin in the image), the image and the organ mask
// (address, dtype code, strides in elements), the shape inputs, the phase-A buffers
#define SG_N0 0
#define SG_N1 1
#define SG_N2 2
#define SG_O0 3
#define SG_O1 4
#define SG_O2 5
#define SG_IMG 6
#define SG_IMG_CODE 7
#define SG_IS0 8
#define SG_IS1 9
#define SG_IS2 10
#define SG_ORG 11
#define SG_ORG_CODE 12
#define SG_OS0 13
#define SG_OS1 14
#define SG_OS2 15
#define SG_CTRL 16
#define SG_G0 17
#define SG_G1 18
#define SG_G2 19
#define SG_W0 20
#define SG_W1 21
#define SG_W2 22
#define SG_C0 23  // the tumor centre (voxel index; positions are (index - centre) * spacing)
#define SG_C1 24
#define SG_C2 25
#define SG_ORIG 26
#define SG_ORGAN 27
#define SG_MASK 28
#define SG_CLIP 29
// phase B: the tight box (origin in the phase-A box, dims, origin in the image), buffers
#define SG_U0 30
#define SG_U1 31
#define SG_U2 32
#define SG_TN0 33
#define SG_TN1 34
#define SG_TN2 35
#define SG_TO0 36
#define SG_TO1 37
#define SG_TO2 38
#define SG_TORIG 39
#define SG_TORGAN 40
#define SG_TMASK 41
// (column 42 unused: the float32 copy of the mask the blur read before it read TMASK)
// the blur: three passes TMASK (bytes) -> BX0 -> BX1 -> BLUR, each a zero-padded correlation
// with a centred Gaussian (float32 kernel address, its length, offset -radius) per axis
#define SG_BKERN0 43
#define SG_BKERN1 44
#define SG_BKERN2 45
#define SG_BKLEN0 46
#define SG_BKLEN1 47
#define SG_BKLEN2 48
#define SG_BOFF0 49
#define SG_BOFF1 50
#define SG_BOFF2 51
#define SG_BX0 52
#define SG_BX1 53
#define SG_BLUR 54
// the texture: lattice noise, band sums (axis 2, 1, 0), block fractions, grid (axis 0, 1, 2)
#define SG_LA0 55
#define SG_LA1 56
#define SG_LA2 57
#define SG_LN0 58
#define SG_LN1 59
#define SG_LN2 60
#define SG_NK0 61
#define SG_NK1 62
#define SG_NOISE 63
#define SG_LS0 64
#define SG_LS1 65
#define SG_LS2 66
#define SG_LW0 67
#define SG_LW1 68
#define SG_LW2 69
#define SG_LK0 70
#define SG_LK1 71
#define SG_LK2 72
#define SG_ZD1 73  // dims after the axis-2 pass: (LN0, LN1, B2): 73, 74, 75
#define SG_ZD2 76  // after the axis-1 pass: (LN0, B1, B2): 76, 77, 78
#define SG_ZA 79
#define SG_ZB 80
#define SG_Z0 81
#define SG_B0 82
#define SG_B1 83
#define SG_B2 84
#define SG_INV0 85
#define SG_INV1 86
#define SG_INV2 87
#define SG_BK0 88
#define SG_BK1 89
#define SG_BLK0 90
#define SG_BLK1 91
#define SG_BLK2 92
#define SG_FRAC 93
#define SG_GKERN0 94  // block sums -> grid: the smoothing kernel, its length, offset per axis
#define SG_GKERN1 95
#define SG_GKERN2 96
#define SG_GKLEN0 97
#define SG_GKLEN1 98
#define SG_GKLEN2 99
#define SG_GOFF0 100
#define SG_GOFF1 101
#define SG_GOFF2 102
#define SG_GD1 103  // dims after the axis-0 pass: (G0, B1, B2): 103, 104, 105
#define SG_GD2 106  // after the axis-1 pass: (G0, G1, B2): 106, 107, 108
#define SG_GA 109
#define SG_GB 110
#define SG_GRID 111
#define SG_G_0 112
#define SG_G_1 113
#define SG_G_2 114
// blend and write-back: the blend's change, the merged change the write-back writes where the
// host reads it (0: none), the merge partners (the write-back merges their changes)
#define SG_DELTA 115
#define SG_MERGED 116
#define SG_PART 117
#define SG_NPART 118
#define SG_DST 119
#define SG_DST_CODE 120
#define SG_DS0 121
#define SG_DS1 122
#define SG_DS2 123
#define SG_DO0 124
#define SG_DO1 125
#define SG_DO2 126
#define SG_ROUND 127
// appearance modes (0 where a tumor has none): the shape pass's q^2 (phase-A box, tight
// box), the parameters and hash keys of synthgen._appearance.blend_params, and the tight
// box's lattice offset from the tumor centre
#define SG_Q2 128
#define SG_TQ2 129
#define SG_APP 130
#define SG_KEYS 131
#define SG_OFF0 132
#define SG_OFF1 133
#define SG_OFF2 134
// 1: a tumor rendered on the host (a hollow-organ wall tumor) that only joins the write-back
// (and its merge)
#define SG_KIND 135
// phase A: the (i, j) part of the shape test per row of the box (sg_shape_row), 3 + 3 g2
// float32 each
#define SG_ROWS 136
// the caller's label map on the device (0: none, or one on the host, written there): its
// address, dtype code, strides (elements) and the value tumor voxels get
#define SG_LBL 137
#define SG_LBL_CODE 138
#define SG_LBLS0 139
#define SG_LBLS1 140
#define SG_LBLS2 141
#define SG_LBL_VAL 142
// phase A: the B-spline prefilter of the tumor's control grid (g x g float64, row major)
#define SG_PRE 143
// phase B: the blend's trilinear texture coordinates (sg_seg_interp): per index of the
// tight box's last axis (the CPU path's interp_coords table) nz int32 base indices, then as
// many float32 fractions; then per (i, j) of axes 0 and 1 (i-major) the four float32
// bilinear weights of the texture grid's rows (4 nx ny floats), then the int32 offset of the
// first of those rows in the grid (nx ny ints)
#define SG_INTERP 144
#define SG_T_WIDTH 145

// ---- float32 table TF ------------------------------------------------------------------
#define SG_F_TLO 0
#define SG_F_THI 1
#define SG_F_CONTRAST 2
#define SG_F_ORGAN_HU 3
#define SG_F_CMIN 4
#define SG_F_CMAX 5
#define SG_F_LO 6
#define SG_F_HI 7
#define SG_F_WIDTH 8

// ---- float64 table TD ------------------------------------------------------------------
#define SG_D_ZSCALE 0
#define SG_D_BASE 1
#define SG_D_SCALE 2
#define SG_D_NCELLS 3
#define SG_D_THR 4
#define SG_D_U0 5
// the voxel spacing (mm) and the shape matrix m = diag(1/r) R^T (row major, 9 values)
#define SG_D_SP0 6
#define SG_D_SP1 7
#define SG_D_SP2 8
#define SG_D_M 9
// the texture grid: position of grid index 0 per axis (mm from the centre) and its step
#define SG_D_TX0 18
#define SG_D_TX1 19
#define SG_D_TX2 20
#define SG_D_STEP 21
// the half-size of the cube the control grid spans per axis (mm)
#define SG_D_EXT0 22
#define SG_D_EXT1 23
#define SG_D_EXT2 24
#define SG_D_WIDTH 25

// ---- dtype codes of image and mask voxels ------------------------------------------------
#define SG_CODE_F32 0
#define SG_CODE_F64 1
#define SG_CODE_I16 2
#define SG_CODE_U8 3
#define SG_CODE_I32 4
#define SG_CODE_U16 5
#define SG_CODE_I8 6
#define SG_CODE_I64 7
#define SG_CODE_U32 8
// AS(T) for the element type T of dtype code `code`: a kernel picks its typed loop once, by
// the row's or the launch's code, outside the loop (not a switch per voxel)
#define SG_AS_CODE(code, AS)                         \
    switch (code) {                                  \
        case SG_CODE_F32: AS(float); break;          \
        case SG_CODE_F64: AS(double); break;         \
        case SG_CODE_I16: AS(short); break;          \
        case SG_CODE_U8: AS(unsigned char); break;   \
        case SG_CODE_I32: AS(int); break;            \
        case SG_CODE_U16: AS(unsigned short); break; \
        case SG_CODE_I8: AS(signed char); break;     \
        case SG_CODE_I64: AS(long long); break;      \
        default: AS(sg_u32); break;                  \
    }

// A voxel's position on one axis, mm from the tumor centre: (index - centre) * spacing in
// float64, as the host's (np.arange(..) - centre) * spacing.
SG_FN double sg_pos(long long d, double spacing) { return (double)d * spacing; }
SG_FN float sg_pos_f32(long long d, double spacing) { return (float)sg_pos(d, spacing); }

// Trilinear base index (returned in *b) and fraction of a position on a texture grid axis of
// n points: synthgen._cpu_kernels.interp_coords_nb, the same float64 operations.
SG_FN float sg_interp(double pos, double origin, double step, int n, int* b) {
    double u = (pos - origin) / step;
    long long fl = (long long)floor(u);
    int top = n - 2 > 0 ? n - 2 : 0;
    long long c = fl < 0 ? 0 : (fl > top ? top : fl);
    *b = (int)c;
    double f = u - (double)c;
    f = f < 0.0 ? 0.0 : (f > 1.0 ? 1.0 : f);
    return (float)f;
}

// A voxel as float32 (as NumPy's astype(float32) rounds).
SG_FN float sg_load_f32(const void* p, int code, long long i) {
    switch (code) {
        case SG_CODE_F32: return ((const float*)p)[i];
        case SG_CODE_F64: return (float)((const double*)p)[i];
        case SG_CODE_I16: return (float)((const short*)p)[i];
        case SG_CODE_U8: return (float)((const unsigned char*)p)[i];
        case SG_CODE_I32: return (float)((const int*)p)[i];
        case SG_CODE_U16: return (float)((const unsigned short*)p)[i];
        case SG_CODE_I8: return (float)((const signed char*)p)[i];
        case SG_CODE_I64: return (float)((const long long*)p)[i];
        default: return (float)((const sg_u32*)p)[i];
    }
}

// A label value stored as NumPy's assignment of an integer to an array of the dtype stores
// it (the driver checks that the value fits the dtype).
SG_FN void sg_store_label(void* p, int code, long long i, long long v) {
    switch (code) {
        case SG_CODE_F32: ((float*)p)[i] = (float)v; break;
        case SG_CODE_F64: ((double*)p)[i] = (double)v; break;
        case SG_CODE_I16: ((short*)p)[i] = (short)v; break;
        case SG_CODE_U8: ((unsigned char*)p)[i] = (unsigned char)v; break;
        case SG_CODE_I32: ((int*)p)[i] = (int)v; break;
        case SG_CODE_U16: ((unsigned short*)p)[i] = (unsigned short)v; break;
        case SG_CODE_I8: ((signed char*)p)[i] = (signed char)v; break;
        case SG_CODE_I64: ((long long*)p)[i] = v; break;
        default: ((sg_u32*)p)[i] = (sg_u32)v; break;
    }
}

// A mask voxel binarised as synthgen does (bool as is, numbers > 0.5).
SG_FN unsigned char sg_load_bin(const void* p, int code, long long i) {
    switch (code) {
        case SG_CODE_F32: return ((const float*)p)[i] > 0.5f;
        case SG_CODE_F64: return ((const double*)p)[i] > 0.5;
        case SG_CODE_I16: return ((const short*)p)[i] > 0;
        case SG_CODE_U8: return ((const unsigned char*)p)[i] > 0;
        case SG_CODE_I32: return ((const int*)p)[i] > 0;
        case SG_CODE_U16: return ((const unsigned short*)p)[i] > 0;
        case SG_CODE_I8: return ((const signed char*)p)[i] > 0;
        case SG_CODE_I64: return ((const long long*)p)[i] > 0;
        default: return ((const sg_u32*)p)[i] > 0;
    }
}
