"""The GPU driver's segment tables, filled by compiled code (numba).

``synthgen._segments`` describes every tumor of a batch by one row of three tables (int64
``T``, float32 ``TF``, float64 ``TD``; ``kernels/segmented.cuh`` names their columns). Filled
column by column with NumPy, a row set cost about a hundred small array operations per phase
whatever the tumor count: most of the driver's host time for one plan. Here each phase's
rows are written in one call; the scratch layouts (offsets of every buffer of every row)
come from one call too. The values are the driver's: the same integer arithmetic, and the
float64 shape matrix by the same division, so a row is what the NumPy fill wrote.

The column numbers are mirrored below as constants (numba compiles them in); :func:`check`
compares them with the header when the driver first reads it, so the two cannot drift apart
unnoticed.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._cpu_kernels import _OPTS, overlap_partners_nb

# ---- the SG_* columns these fills write (kernels/segmented.cuh) -------------------------
N0, O0, IMG, IMG_CODE, IS0, ORG, ORG_CODE, OS0 = 0, 3, 6, 7, 8, 11, 12, 13
CTRL, G0, W0, C0, ORIG, ORGAN, MASK, CLIP = 16, 17, 20, 23, 26, 27, 28, 29
U0, TN0, TO0, TORIG, TORGAN, TMASK = 30, 33, 36, 39, 40, 41
BKERN0, BKLEN0, BOFF0, BX0, BX1, BLUR = 43, 46, 49, 52, 53, 54
LA0, LN0, NK0, NOISE, LS0, LW0, LK0 = 55, 58, 61, 63, 64, 67, 70
ZD1, ZD2, ZA, ZB, Z0 = 73, 76, 79, 80, 81
B0, INV0, BK0, BLK0, FRAC, GKERN0, GKLEN0, GOFF0 = 82, 85, 88, 90, 93, 94, 97, 100
GD1, GD2, GA, GB, GRID, G_0 = 103, 106, 109, 110, 111, 112
DELTA, MERGED, PART, NPART, DST, DST_CODE = 115, 116, 117, 118, 119, 120
DS0, DO0, ROUND = 121, 124, 127
Q2, TQ2, APP, KEYS, OFF0, KIND, ROWS = 128, 129, 130, 131, 132, 135, 136
LBL, LBL_CODE, LBLS0, LBL_VAL, PRE, INTERP, T_WIDTH = 137, 138, 139, 142, 143, 144, 145
F_TLO, F_CONTRAST, F_ORGAN_HU, F_CMIN, F_WIDTH = 0, 2, 3, 4, 8
D_ZSCALE, D_SP0, D_M, D_TX0, D_STEP, D_EXT0, D_WIDTH = 0, 6, 9, 18, 21, 22, 25

_MIRRORED = {k: v for k, v in globals().items()
             if k.isupper() and not k.startswith("_") and isinstance(v, int)}  # fmt: skip

#: Phase B's float32 scratch buffers per row, in the order of the layout's columns.
F32 = ("torig", "bx0", "bx1", "blur", "merged", "out", "noise", "za", "zb", "z0", "frac", "ga",
       "gb", "grid", "tq2", "delta", "interp")  # fmt: skip
# their columns in the layout (unpacking fails if F32 changes length)
(_TORIG, _BX0, _BX1, _BLUR, _MERGED, _OUT, _NOISE, _ZA, _ZB, _Z0, _FRAC, _GA, _GB, _GRID, _TQ2,
 _DELTA, _INTERP) = range(len(F32))  # fmt: skip
# (the buffers whose address goes into the column of the same name)
_F32_COLS = ((_TORIG, TORIG), (_BX0, BX0), (_BX1, BX1), (_BLUR, BLUR),
             (_NOISE, NOISE), (_ZA, ZA), (_ZB, ZB), (_Z0, Z0), (_FRAC, FRAC), (_GA, GA),
             (_GB, GB), (_GRID, GRID), (_DELTA, DELTA), (_INTERP, INTERP))  # fmt: skip


# Runs of header columns the fills write as base + offset (beyond each "...0" base, whose
# "...1" and "...2" siblings must follow it).
_RUNS = (("F_TLO", "F_THI"), ("F_CMIN", "F_CMAX", "F_LO", "F_HI"),
         ("D_ZSCALE", "D_BASE", "D_SCALE", "D_NCELLS", "D_THR", "D_U0"))  # fmt: skip


def check(columns) -> None:
    """Raise unless the header's columns are those the fills assume (``columns``: the parsed
    ``SG_*`` values, ``columns.N0`` for ``SG_N0``): every mirrored number, the ``1``/``2``
    siblings of each ``0`` base right after it, the runs of :data:`_RUNS`, the nine shape
    matrix columns before the texture grid's, and the dtype codes the driver writes."""
    got = vars(columns) if not isinstance(columns, dict) else columns
    bad = {k: (v, got.get(k)) for k, v in _MIRRORED.items() if got.get(k) != v}
    for k, v in _MIRRORED.items():
        if k.endswith("0"):
            for i in (1, 2):
                sib = k[:-1] + str(i)
                if sib in got and got[sib] != v + i and not (k, i) == ("BX0", 1):
                    bad[sib] = (v + i, got[sib])
    for run in _RUNS:
        for i, k in enumerate(run):
            if got.get(k) != got.get(run[0], -99) + i:
                bad[k] = ("follows " + run[0], got.get(k))
    if got.get("D_TX0", 0) < D_M + 9:
        bad["D_M"] = ("9 columns before D_TX0", got.get("D_TX0"))
    for k, v in (("CODE_F32", 0), ("CODE_U8", 3)):
        if got.get(k) != v:
            bad[k] = (v, got.get(k))
    if bad:
        raise RuntimeError(
            "synthgen/_seg_tables.py mirrors columns of kernels/segmented.cuh that differ "
            f"(name: (expected, header)): {bad}"
        )


@nb.njit(inline="always", **_OPTS)
def _put_access(T, r, col, code_col, stride_col, v):
    """An image or mask access of a job (``v``: address, dtype code, three strides) into row
    ``r``'s columns ``col``, ``code_col`` and the three from ``stride_col``."""
    T[r, col] = v[0]
    T[r, code_col] = v[1]
    for a in range(3):
        T[r, stride_col + a] = v[2 + a]


@nb.njit(inline="always", **_OPTS)
def check_span(T, r, tn):
    """Row ``r``'s write-back destination (strides from column DS0, tight box ``tn[r]``)
    within the 32-bit offsets the write-back addresses a voxel with from the box's origin:
    ValueError where the box spans 2^31 or more elements of its image (or of the row's own
    buffer, for a host image: 2^31 voxels)."""
    span = 0
    for a in range(3):
        span += abs(T[r, DS0 + a]) * max(tn[r, a] - 1, 0)
    if span >= 2**31:
        raise ValueError(
            "a tumor's box spans 2^31 or more elements of its image, past the GPU kernels' "
            "32-bit offsets: render it on the CPU (device='cpu')"
        )


@nb.njit(inline="always", **_OPTS)
def _put3(T, r, col, x, y, z):
    """Three consecutive columns of row ``r`` from ``col``."""
    T[r, col] = x
    T[r, col + 1] = y
    T[r, col + 2] = z


@nb.njit(**_OPTS)
def layout_nb(sizes, itemsize):
    """Element offsets of the buffers of a (rows x buffers) size matrix carved out of one
    allocation with 16-byte aligned starts, and the allocation's length in elements."""
    align = max(1, 16 // itemsize)
    offs = np.empty(sizes.shape, dtype=np.int64)
    at = 0
    for r in range(sizes.shape[0]):
        for c in range(sizes.shape[1]):
            offs[r, c] = at
            at += (sizes[r, c] + align - 1) // align * align
    return offs, at + align


#: Phase B's flat schedules (:func:`schedules_nb`), one per distinct per-row element count
#: of its launches: each names an :data:`F32` buffer whose size is the launch's elements per
#: row (0 where a row takes no part, such as host rows in the texture): ``torig``, the tight
#: box (the gather, the blur passes, the blend), ``out`` every row's (the write-back's and
#: the label write's), the others the buffer the launch writes.
SCHED_B = ("torig", "out", "noise", "za", "zb", "z0", "frac", "ga", "gb", "grid", "interp")
_SCHED_B_COLS = np.array([F32.index(k) for k in SCHED_B], dtype=np.int64)
#: Phase B's launches of independent steps (``kernels/segmented.cu``: ``sg_seg_first``,
#: ``sg_seg_conv_band`` three times, ``sg_seg_apply_label``): the :data:`SCHED_B` schedule of
#: each step, in the order of the kernel's steps (:func:`chain_schedules_nb`).
CHAINS_B = (("torig", "noise", "interp"), ("torig", "za"), ("torig", "zb"), ("torig", "z0"),
            ("out", "out"))  # fmt: skip
_CHAINS_B_IDX = np.full((len(CHAINS_B), max(map(len, CHAINS_B))), -1, dtype=np.int64)
for _g, _chain in enumerate(CHAINS_B):
    _CHAINS_B_IDX[_g, : len(_chain)] = [SCHED_B.index(k) for k in _chain]
del _g, _chain


@nb.njit(**_OPTS)
def schedules_nb(totals, cols, per_block, cap, grid2d=False, most=0):
    """The flat block schedules of segmented launches (``kernels/segmented.cu``): launch
    ``k`` walks ``totals[r, cols[k]]`` elements of row ``r``, and gets ``ceil(elements /
    per_block)`` blocks for it, at most ``cap`` (none for a row without elements). Returns
    the ``(len(cols), n + 1)`` int32 prefix sums (row ``r``'s blocks are ``S[k, r]`` ..
    ``S[k, r + 1] - 1``) and each launch's block count.

    ``most``: a launch that would get more than ``most`` blocks (0: no limit) gets blocks of
    ``s`` times ``per_block`` elements instead, ``s = ceil(uncapped / most)`` with
    ``uncapped`` its blocks before the cap: at most ``most`` plus one a row (each row with
    elements keeps a block). A large batch then runs a few waves of long blocks, each
    block's start (its segment search and row reads) spread over ``s`` times the elements,
    while a small call keeps a block per ``per_block`` elements to fill the device.

    ``grid2d``: every row gets the blocks of the launch's largest row instead, the launch of
    a 2-D grid (the kernels before the flat schedules; the surplus blocks find no element):
    for benchmarks comparing the two on a GPU."""
    n = totals.shape[0]
    S = np.zeros((cols.shape[0], n + 1), dtype=np.int32)
    count = np.zeros(cols.shape[0], dtype=np.int64)
    for k in range(cols.shape[0]):
        most_e = 0
        if grid2d:
            for r in range(n):
                most_e = max(most_e, totals[r, cols[k]])
        at, uncapped = _schedule_nb(S[k], totals, cols[k], per_block, cap, grid2d, most_e)
        if most > 0 and not grid2d and at > most:  # longer blocks past the limit
            scale = (uncapped + most - 1) // most
            per = per_block * scale if per_block <= (1 << 62) // scale else 1 << 62
            at, _ = _schedule_nb(S[k], totals, cols[k], per, cap, grid2d, most_e)
        count[k] = at
    return S, count


@nb.njit(**_OPTS)
def chain_schedules_nb(S, chains):
    """The schedules of launches that run the steps of several launches of
    :func:`schedules_nb` (prefix sums ``S``) side by side: launch ``g`` runs the steps of
    schedules ``chains[g, 0]``, ``chains[g, 1]``, ... (-1: no more), its segments the
    ``n`` rows of the first step, then those of the second, each row with the blocks its own
    schedule gives it (segment ``s`` is row ``s % n`` of step ``s // n``). Returns the
    schedules' ``k n + 1`` int32 prefix sums one after another, each one's start in that
    array and its block count."""
    n = S.shape[1] - 1
    G = chains.shape[0]
    offs = np.empty(G, dtype=np.int64)
    blocks = np.empty(G, dtype=np.int64)
    size = 0
    for g in range(G):
        for c in range(chains.shape[1]):
            if chains[g, c] >= 0:
                size += n
        size += 1
    out = np.empty(size, dtype=np.int32)
    at = 0
    for g in range(G):
        offs[g] = at
        base = 0
        for c in range(chains.shape[1]):
            k = chains[g, c]
            if k < 0:
                continue
            for r in range(n):
                out[at] = base + S[k, r]
                at += 1
            base += S[k, n]
        out[at] = base
        at += 1
        blocks[g] = base
    return out, offs, blocks


@nb.njit(**_OPTS)
def _schedule_nb(S_k, totals, col, per, cap, grid2d, most_e):
    """One launch's prefix sums into ``S_k`` (:func:`schedules_nb`) at ``per`` elements a
    block; ``(blocks, blocks before the cap)``."""
    at = 0
    uncapped = 0
    for r in range(totals.shape[0]):
        e = most_e if grid2d else totals[r, col]
        if e > 0:
            b = (e + per - 1) // per
            uncapped += b
            at += min(b, cap)
        S_k[r + 1] = at
    return at, uncapped


@nb.njit(**_OPTS)
def phase_a_sizes_nb(lo, hi, keep, g, has_app):
    """Phase A's sizes from the tumors' boxes ``lo..hi`` (``(n, 3)``; an empty, even
    inverted, box has none) and grid sizes ``g``, for the kept tumors ``keep`` (row ``r`` is
    tumor ``keep[r]``, ``has_app[r]``: it has appearance modes). Returns ``(nb, bb, fa, ua,
    tot)``: the box sizes; the bounding-box accumulators of the rows (``(max(n, 1), 7)``
    int32: lower bounds at the box size, upper at -1, count 0); the float32 (orig, q2, shape
    rows, B-spline weight rows) and uint8 (organ, mask) scratch sizes per row; the elements
    of phase A's launches per row (``(n, 3)``: the box's (i, j) rows, its voxels, its
    B-spline weight rows), the totals of their schedules (:func:`schedules_nb`)."""
    n_all = lo.shape[0]
    n = keep.shape[0]
    nb_ = np.empty((n_all, 3), dtype=np.int64)
    for q in range(n_all):
        for a in range(3):
            nb_[q, a] = max(hi[q, a] - lo[q, a], 0)
    bb = np.zeros((max(n, 1), 7), dtype=np.int32)
    fa = np.empty((n, 4), dtype=np.int64)
    ua = np.empty((n, 2), dtype=np.int64)
    tot = np.empty((n, 3), dtype=np.int64)
    for r in range(n):
        q = keep[r]
        for a in range(3):
            bb[r, 2 * a] = nb_[q, a]
            bb[r, 2 * a + 1] = -1
        rows = nb_[q, 0] * nb_[q, 1]
        nv = rows * nb_[q, 2]
        n_w = nb_[q, 0] + nb_[q, 1] + nb_[q, 2]
        fa[r, 0] = nv
        fa[r, 1] = nv if has_app[r] else 0
        fa[r, 2] = rows * (3 + 3 * g[q])  # sg_shape_row per (i, j)
        fa[r, 3] = n_w * g[q]  # the weight rows of the three axes
        ua[r, 0] = nv
        ua[r, 1] = nv
        tot[r, 0] = rows
        tot[r, 1] = nv
        tot[r, 2] = n_w
    return nb_, bb, fa, ua, tot


@nb.njit(**_OPTS)
def phase_a_nb(T, TF, TD, keep, nb_, lo, centre, g, ctrl, pre, ext, fa_base, fa_offs,
               ua_base, ua_offs, has_app, clip, job, img_on, img, org_on, org, tissue, sp, rot,
               radii):  # fmt: skip
    """Phase A's rows, row ``r`` for tumor ``keep[r]``: the conservative box, the image and
    organ reads (where they are on the device), the shape inputs and the phase-A buffers.
    Per tumor: ``nb_``, ``lo``, ``centre``, ``g``, ``ctrl`` (address of its control
    displacements), ``pre`` (address of its grid's prefilter), ``ext`` (control extent),
    ``clip``, ``job``, ``sp``, ``rot``, ``radii``; per row: the float32 (orig, q2, shape rows,
    weight rows) and uint8 (organ, mask) buffers' element offsets from their bases,
    ``has_app``."""
    for r in range(keep.shape[0]):
        q = keep[r]
        j = job[q]
        w_at = fa_base + 4 * fa_offs[r, 3]  # the weight rows, axis after axis
        for a in range(3):
            T[r, N0 + a] = nb_[q, a]
            T[r, O0 + a] = lo[q, a]
            T[r, C0 + a] = centre[q, a]
            T[r, G0 + a] = g[q]
            T[r, W0 + a] = w_at
            w_at += 4 * nb_[q, a] * g[q]
            TD[r, D_SP0 + a] = sp[q, a]
            TD[r, D_EXT0 + a] = ext[q, a]
            for b in range(3):  # m = diag(1/radii) R^T, row major
                TD[r, D_M + 3 * a + b] = rot[q, b, a] / radii[q, a]
        T[r, CTRL] = ctrl[q]
        T[r, PRE] = pre[q]
        T[r, ORIG] = fa_base + 4 * fa_offs[r, 0]
        T[r, Q2] = fa_base + 4 * fa_offs[r, 1] if has_app[r] else 0
        T[r, ROWS] = fa_base + 4 * fa_offs[r, 2]
        T[r, ORGAN] = ua_base + ua_offs[r, 0]
        T[r, MASK] = ua_base + ua_offs[r, 1]
        T[r, CLIP] = clip[q]
        if img_on[j]:
            _put_access(T, r, IMG, IMG_CODE, IS0, img[j])
        if org_on[j]:
            _put_access(T, r, ORG, ORG_CODE, OS0, org[j])
        TF[r, F_TLO] = tissue[j, 0]
        TF[r, F_TLO + 1] = tissue[j, 1]


@nb.njit(inline="always", **_OPTS)
def _host_merged(host_out, r, ne, n_part):
    """Whether row ``r`` has a ``merged`` buffer: its image is on the host (``host_out``) and
    the host reads its change merged (a host row, after the ``ne`` ellipsoid rows, or a row
    with merge partners); the write-back writes it."""
    return host_out and (r >= ne or n_part[r] > 0)


@nb.njit(**_OPTS)
def phase_b_sizes_nb(tn, ne, n_lat, blocks, grid, has_app, n_part, host_out):
    """Phase B's float32 scratch sizes per row (columns: :data:`F32`; host rows, after the
    ``ne`` ellipsoid rows, have ``out`` and ``merged`` only) and the uint8 ones (organ,
    mask). ``merged`` only where :func:`_host_merged` (``host_out``: the row's image is on
    the host); the write-back merges the others' changes as it reads them."""
    nl = tn.shape[0]
    f32 = np.zeros((nl, len(F32)), dtype=np.int64)
    u8 = np.zeros((nl, 2), dtype=np.int64)
    for r in range(nl):
        v = tn[r, 0] * tn[r, 1] * tn[r, 2]
        f32[r, _MERGED] = v if _host_merged(host_out[r], r, ne, n_part) else 0
        f32[r, _OUT] = v
        if r >= ne:
            continue
        ln, bs, gs = n_lat[r], blocks[r], grid[r]
        # (the blend's texture reads and its per-(i, j) table take 32-bit offsets)
        if gs[0] * gs[1] * gs[2] >= 2**31 or 4 * tn[r, 0] * tn[r, 1] >= 2**31:
            raise ValueError(
                "a tumor's texture grid or tight box is past the GPU kernels' 32-bit offsets "
                "(2^31 values): render it on the CPU (device='cpu')"
            )
        # the tight box's buffers, then the texture's: the lattice noise, the three band
        # passes' outputs, the block fractions and the three grid passes' outputs
        for c in (_TORIG, _BX0, _BX1, _BLUR, _DELTA):
            f32[r, c] = v
        f32[r, _NOISE] = ln[0] * ln[1] * ln[2]
        f32[r, _ZA] = ln[0] * ln[1] * bs[2]
        f32[r, _ZB] = ln[0] * bs[1] * bs[2]
        f32[r, _Z0] = bs[0] * bs[1] * bs[2]
        f32[r, _FRAC] = bs[0] * bs[1] * bs[2]
        f32[r, _GA] = gs[0] * bs[1] * bs[2]
        f32[r, _GB] = gs[0] * gs[1] * bs[2]
        f32[r, _GRID] = gs[0] * gs[1] * gs[2]
        f32[r, _TQ2] = v if has_app[r] else 0
        # the blend's texture coordinates: an int32 index and a float32 fraction per index
        # of the last axis, then four float32 weights and an int32 offset per (i, j) of axes
        # 0 and 1 (sg_seg_interp makes one entry per index and per (i, j): its schedule has
        # blocks for more elements than it walks, the surplus leaves at once)
        f32[r, _INTERP] = 2 * tn[r, 2] + 5 * tn[r, 0] * tn[r, 1]
        u8[r, 0] = v
        u8[r, 1] = v
    return f32, u8


@nb.njit(**_OPTS)
def phase_b_boxes_nb(hit, keep, lo, pad, nb_, jk, centre, sp, w_tn, w_to, w_job):
    """Phase B's rows from phase A's boxes: the live ellipsoid rows (those whose mask has a
    voxel, ``hit[:, 6] > 0``; row ``r`` of ``hit`` is tumor ``keep[r]``), then the ``nw``
    host rows (``w_tn``, ``w_to``, ``w_job``).

    Per ellipsoid row, the tight box is the mask's box in the phase-A box grown by the blur's
    reach ``pad`` and clipped to that box (``nb_``), placed at the box origin ``lo``; its
    corners in mm from the tumor centre (``(index - centre) * spacing``, the texture's
    extent). Returns ``(live, qe, u0, tn, to, job_of, tnv, lo_mm, hi_mm, n_part, part_off,
    part_flat)``: the live rows, their tumors, tight-box offsets in the phase-A box, sizes
    and origins (all rows), jobs, voxel counts, and the merge partners of every row
    (:func:`synthgen._cpu_kernels.overlap_partners_nb`)."""
    n = hit.shape[0]
    ne = 0
    for r in range(n):
        if hit[r, 6] > 0:
            ne += 1
    nw = w_tn.shape[0]
    nl = ne + nw
    live = np.empty(ne, dtype=np.int64)
    qe = np.empty(ne, dtype=np.int64)
    u0 = np.empty((ne, 3), dtype=np.int64)
    tn = np.empty((nl, 3), dtype=np.int64)
    to = np.empty((nl, 3), dtype=np.int64)
    job_of = np.empty(nl, dtype=np.int64)
    tnv = np.empty(nl, dtype=np.int64)
    lo_mm = np.empty((ne, 3), dtype=np.float64)
    hi_mm = np.empty((ne, 3), dtype=np.float64)
    e = 0
    for r in range(n):
        if hit[r, 6] <= 0:
            continue
        q = keep[r]
        live[e] = r
        qe[e] = q
        job_of[e] = jk[r]
        for a in range(3):
            a0 = max(np.int64(hit[r, 2 * a]) - pad[q, a], 0)
            a1 = min(np.int64(hit[r, 2 * a + 1]) + pad[q, a] + 1, nb_[q, a])
            u0[e, a] = a0
            tn[e, a] = a1 - a0
            to[e, a] = lo[q, a] + a0
            lo_mm[e, a] = (to[e, a] - centre[q, a]) * sp[q, a]
            hi_mm[e, a] = (to[e, a] + tn[e, a] - 1 - centre[q, a]) * sp[q, a]
        e += 1
    for w in range(nw):
        for a in range(3):
            tn[ne + w, a] = w_tn[w, a]
            to[ne + w, a] = w_to[w, a]
        job_of[ne + w] = w_job[w]
    for r in range(nl):
        tnv[r] = tn[r, 0] * tn[r, 1] * tn[r, 2]
    hi = to + tn
    n_part, part_off, part_flat = overlap_partners_nb(job_of, to, hi)
    return live, qe, u0, tn, to, job_of, tnv, lo_mm, hi_mm, n_part, part_off, part_flat


#: The pack parts whose device addresses :func:`phase_b_nb` takes (``bases``), in order.
BASES = ("part", "blur", "smooth", "band_starts", "band_weights", "band_inv", "app", "keys")


@nb.njit(**_OPTS)
def phase_b_nb(T, TF, TD, ne, tn, to, job, img_on, img, jround, ranges, tissue, organ_hu,
               lab_on, lab, lab_val, f32_base, f32_offs, u8_base, u8_offs,
               bases, part_off, n_part, qe, live, nb_, clip, centre, sp, u0, TA, app_row,
               app_step, key_step, boffs, blen, row, woff, koff, klen, kk, goff, lat0, n_lat,
               noise_key, bern_key, blocks, block0, grid, contrast, scalars, origin,
               step):  # fmt: skip
    """Phase B's rows: every row's tight box, merge partners and write-back (to its image
    where that is on the device, else to its ``out`` buffer) and label write (where its
    job's label map is on the device: ``lab_on``, ``lab`` as ``img``, value ``lab_val``);
    the ``ne`` ellipsoid rows' blur, texture, blend and appearance columns.

    Buffers: base address and element offsets of the float32 (:data:`F32`, the blend's
    change ``delta`` among them: every element written by the blend) and uint8 (organ,
    mask) scratch; ``bases``: device addresses of the pack parts named in :data:`BASES`, the
    rows' entries at ``part_off`` (int64), ``boffs``/``koff`` (float32
    kernels), ``row`` (int64 starts, float64 norms), ``woff`` (float32 weights), ``app_row``
    (a row's index among those with appearance modes, -1: none; ``app_step``/``key_step``
    bytes apart). Ellipsoid row ``r`` is kept tumor ``live[r]`` and tumor ``qe[r]``: ``nb_``,
    ``clip``, ``centre``, ``sp`` per tumor; its phase-A row ``TA[live[r]]`` (the phase-A
    buffers) and ``contrast`` per kept tumor; the texture tables per row."""
    for r in range(tn.shape[0]):
        j = job[r]
        for a in range(3):
            T[r, TN0 + a] = tn[r, a]
            T[r, TO0 + a] = to[r, a]
        # the merged change where the host reads it (0: not written)
        has_merged = _host_merged(not img_on[j], r, ne, n_part)
        T[r, MERGED] = f32_base + 4 * f32_offs[r, _MERGED] if has_merged else 0
        T[r, PART] = bases[0] + 8 * part_off[r]
        T[r, NPART] = n_part[r]
        if img_on[j]:
            _put_access(T, r, DST, DST_CODE, DS0, img[j])
            for a in range(3):
                T[r, DO0 + a] = to[r, a]
        else:  # a host image: the row's own out buffer, C order
            T[r, DST] = f32_base + 4 * f32_offs[r, _OUT]
            T[r, DST_CODE] = 0
            T[r, DS0] = tn[r, 1] * tn[r, 2]
            T[r, DS0 + 1] = tn[r, 2]
            T[r, DS0 + 2] = 1
        check_span(T, r, tn)
        T[r, ROUND] = jround[j]
        if lab_on[j]:
            _put_access(T, r, LBL, LBL_CODE, LBLS0, lab[j])
            T[r, LBL_VAL] = lab_val[j]
        for c in range(4):
            TF[r, F_CMIN + c] = ranges[j, c]
        if r >= ne:
            continue
        # ---- an ellipsoid row
        q, k = qe[r], live[r]
        for b, col in _F32_COLS:
            T[r, col] = f32_base + 4 * f32_offs[r, b]
        T[r, CLIP] = clip[q]
        T[r, ORIG] = TA[k, ORIG]
        T[r, ORGAN] = TA[k, ORGAN]
        T[r, MASK] = TA[k, MASK]
        T[r, TORGAN] = u8_base + u8_offs[r, 0]
        T[r, TMASK] = u8_base + u8_offs[r, 1]
        for a in range(3):
            T[r, N0 + a] = nb_[q, a]
            T[r, U0 + a] = u0[r, a]
            T[r, C0 + a] = centre[q, a]
            T[r, BKERN0 + a] = bases[1] + 4 * boffs[r, a]
            T[r, BKLEN0 + a] = blen[r, a]
            T[r, BOFF0 + a] = -((blen[r, a] - 1) // 2)
            T[r, LS0 + a] = bases[3] + 8 * row[r, a]
            T[r, LW0 + a] = bases[4] + 4 * woff[r, a]
            T[r, INV0 + a] = bases[5] + 8 * row[r, a]
            T[r, GKERN0 + a] = bases[2] + 4 * koff[r]
            T[r, GKLEN0 + a] = klen[r]
            T[r, LK0 + a] = kk[r, a]
            T[r, GOFF0 + a] = goff[r, a]
            T[r, LA0 + a] = lat0[r, a]
            T[r, LN0 + a] = n_lat[r, a]
            T[r, B0 + a] = blocks[r, a]
            T[r, BLK0 + a] = block0[r, a]
            T[r, G_0 + a] = grid[r, a]
            TD[r, D_SP0 + a] = sp[q, a]
            TD[r, D_TX0 + a] = origin[r, a]
        for c in range(2):
            T[r, NK0 + c] = noise_key[r, c]
            T[r, BK0 + c] = bern_key[r, c]
        # dims after the band passes (LN0, LN1, B2), (LN0, B1, B2) and after the grid passes
        # (G0, B1, B2), (G0, G1, B2)
        _put3(T, r, ZD1, n_lat[r, 0], n_lat[r, 1], blocks[r, 2])
        _put3(T, r, ZD2, n_lat[r, 0], blocks[r, 1], blocks[r, 2])
        _put3(T, r, GD1, grid[r, 0], blocks[r, 1], blocks[r, 2])
        _put3(T, r, GD2, grid[r, 0], grid[r, 1], blocks[r, 2])
        m = app_row[r]
        if m >= 0:
            T[r, Q2] = TA[k, Q2]
            T[r, TQ2] = f32_base + 4 * f32_offs[r, _TQ2]
            T[r, APP] = bases[6] + app_step * m
            T[r, KEYS] = bases[7] + key_step * m
            for a in range(3):
                T[r, OFF0 + a] = to[r, a] - centre[q, a]
        TF[r, F_TLO] = tissue[j, 0]
        TF[r, F_TLO + 1] = tissue[j, 1]
        TF[r, F_CONTRAST] = contrast[k]
        TF[r, F_ORGAN_HU] = organ_hu[j]
        for c in range(6):
            TD[r, D_ZSCALE + c] = scalars[r, c]
        TD[r, D_STEP] = step[r]
