"""The CUDA backend against the CPU path.

Every test runs the backend's driver (``synthgen._cuda``) twice over: on the host stand-in
(``tests/_cuda_emu.py``: the same CUDA C sources compiled for the CPU, NumPy as the array
module), which needs no GPU and runs in CI, and on a real GPU through CuPy
(``@pytest.mark.gpu``, skipped where there is none). The acceptance bar is the issue's: tumor
masks agree on at least 99.9% of the tumor's voxels, image values differ by at most 1 HU and
by at most 0.05 HU on average inside the tumor boxes.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from _cuda_emu import HostBackend, signatures, to_device

import synthgen
from synthgen import _cpu_kernels as k
from synthgen import _cuda
from synthgen._device import DeviceError, array_kind, parse_device, resolve_device

ORGANS = [
    ("liver-classic", "liver", "mix"),
    ("liver-classic", "liver", "large"),
    ("liver", "liver", None),
    ("pancreas", "pancreas", None),
    ("kidney", "kidney_left", "large"),
    ("colon", "colon", None),
    ("esophagus", "esophagus", None),
    ("uterus", "uterus", None),
]


def _gpu_backend():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError
    except Exception:
        pytest.skip("no CUDA GPU with CuPy")
    return _cuda.CupyBackend(0), cupy.asarray


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> HostBackend:
    try:
        return HostBackend(tmp_path_factory.mktemp("cuda-emu"))
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture(params=["emu", pytest.param("gpu", marks=pytest.mark.gpu)])
def backend(request):
    """``(backend, to_device)``: the host stand-in, or CuPy on GPU 0."""
    if request.param == "emu":
        return request.getfixturevalue("emu"), to_device
    return _gpu_backend()


@pytest.fixture(scope="module")
def organ_masks(small_phantom) -> dict[str, np.ndarray]:
    return {n: small_phantom.mask(n) for n in ("liver", "pancreas", "kidney_left", "colon",
                                               "esophagus", "uterus")}  # fmt: skip


def _plan(ph, mask, preset, seed, size):
    return synthgen.plan(ph.image, mask, organ=preset, seed=seed, spacing=ph.spacing, size=size)


def _compare(ref: synthgen.RenderResult, got: synthgen.RenderResult, be) -> None:
    img = be.download(got.image) if be.on_device(got.image) else np.asarray(got.image)
    tm_ref = ref.tumor_mask
    tm = got.tumor_mask
    tm = be.download(tm) if be.on_device(tm) else np.asarray(tm)
    n_ref = int(tm_ref.sum())
    if n_ref:
        agree = 1.0 - np.count_nonzero(tm != tm_ref) / n_ref
        assert agree >= 0.999, f"tumor masks agree on {agree:.5f} of the voxels"
    else:
        assert not tm.any()
    diff = np.abs(img.astype(np.float64) - ref.image.astype(np.float64))
    assert diff.max() <= 1.0, f"max |GPU - CPU| = {diff.max()} HU"
    for rec in ref.tumors:
        if rec.box:
            sl = tuple(slice(a, b) for a, b in rec.box)
            assert diff[sl].mean() <= 0.05
    assert (
        [r.voxels for r in got.tumors] == [r.voxels for r in ref.tumors]
        or n_ref == 0
        or (
            abs(sum(r.voxels for r in got.tumors) - sum(r.voxels for r in ref.tumors))
            <= 0.001 * n_ref
        )
    )
    for a, b in zip(ref.tumors, got.tumors, strict=True):
        assert a.box == b.box
        assert abs(a.mean_contrast_hu - b.mean_contrast_hu) <= 0.05


@pytest.mark.parametrize(("preset", "organ", "size"), ORGANS)
def test_render_matches_the_cpu(backend, small_phantom, organ_masks, preset, organ, size):
    be, dev = backend
    ph = small_phantom
    mask = organ_masks[organ]
    for seed in (1, 2):
        plan = _plan(ph, mask, preset, seed, size)
        ref = synthgen.render(plan, ph.image, mask)
        got = _cuda.render_on_gpu([plan], [dev(ph.image)], [dev(mask)], device_id=0, be=be)[0]
        _compare(ref, got, be)
        assert ref.tumors, "the plan has tumors"


def test_host_data_travels_as_boxes(backend, small_phantom, organ_masks):
    """NumPy inputs with a GPU backend: only the boxes go to the device; input untouched."""
    be, _ = backend
    ph = small_phantom
    mask = organ_masks["liver"]
    plan = _plan(ph, mask, "liver-classic", 5, "mix")
    before = ph.image.copy()
    got = _cuda.render_on_gpu([plan], [ph.image], [mask], device_id=0, be=be)[0]
    assert isinstance(got.image, np.ndarray) and not be.on_device(got.image)
    np.testing.assert_array_equal(ph.image, before)
    _compare(synthgen.render(plan, ph.image, mask), got, be)
    assert got.label.dtype == np.uint8 and set(np.unique(got.label)) == {0, 1, 2}


def test_out_renders_in_place_on_the_device(backend, small_phantom, organ_masks):
    be, dev = backend
    ph = small_phantom
    mask = organ_masks["liver"]
    plan = _plan(ph, mask, "liver", 9, None)
    img = dev(ph.image)
    res = _cuda.render_on_gpu([plan], [img], [dev(mask)], device_id=0, outs=[img], be=be)[0]
    assert res.image is img
    _compare(synthgen.render(plan, ph.image, mask), res, be)


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64])
def test_dtypes(backend, small_phantom, organ_masks, dtype):
    be, dev = backend
    ph = small_phantom
    mask = organ_masks["liver"]
    image = ph.image.astype(dtype)
    if dtype != np.int16:
        image = image + np.asarray(0.25, dtype=dtype)  # fractional HU survive where untouched
    plan = _plan(ph, mask, "liver-classic", 3, "medium")
    ref = synthgen.render(plan, image, mask)
    got = _cuda.render_on_gpu([plan], [dev(image)], [dev(mask)], device_id=0, be=be)[0]
    assert got.image.dtype == dtype
    _compare(ref, got, be)
    out = be.download(got.image)
    untouched = ~np.asarray(ref.tumor_mask)
    for rec in ref.tumors:
        if rec.box:
            untouched[tuple(slice(a, b) for a, b in rec.box)] = False
    np.testing.assert_array_equal(out[untouched], image[untouched])


def test_batched_render_equals_one_by_one(backend, small_phantom, organ_masks):
    """Many plans of one scan and of another organ in one batch: each result as alone."""
    be, dev = backend
    ph = small_phantom
    img = dev(ph.image)
    jobs = [("liver-classic", "liver", "mix", s) for s in range(6)]
    jobs += [("kidney", "kidney_left", "large", 11), ("pancreas", "pancreas", None, 12)]
    plans = [_plan(ph, organ_masks[o], p, s, z) for p, o, z, s in jobs]
    masks = [dev(organ_masks[o]) for _, o, _, _ in jobs]
    be_launches = len(getattr(be, "launches", []))
    batch = _cuda.render_on_gpu(plans, [img] * len(plans), masks, device_id=0, be=be)
    if hasattr(be, "launches"):
        assert len(be.launches) > be_launches
    for (_p, o, _z, _s), plan, got in zip(jobs, plans, batch, strict=True):
        alone = _cuda.render_on_gpu([plan], [img], [dev(organ_masks[o])], device_id=0, be=be)[0]
        np.testing.assert_array_equal(be.download(got.image), be.download(alone.image))
        _compare(synthgen.render(plan, ph.image, organ_masks[o]), got, be)
    assert np.array_equal(be.download(img), ph.image), "the shared input was not modified"


def test_render_batch_api_on_the_cpu(small_phantom, organ_masks):
    ph = small_phantom
    mask = organ_masks["liver"]
    plans = [_plan(ph, mask, "liver", s, None) for s in range(3)]
    res = synthgen.render_batch(plans, ph.image, mask)
    for p, r in zip(plans, res, strict=True):
        np.testing.assert_array_equal(r.image, synthgen.render(p, ph.image, mask).image)
    with pytest.raises(ValueError, match="2 given for 3 plans"):
        synthgen.render_batch(plans, [ph.image, ph.image], mask)


# ---------------------------------------------------------------------------------------
# kernel by kernel: fresh random inputs, poisoned outputs (every element must be written)
# ---------------------------------------------------------------------------------------


def test_every_kernel_is_driven_and_declared(emu):
    """KERNELS names exactly the __global__ functions of kernels/."""
    found = {}
    for src in _cuda.kernel_dir().glob("*.cu"):
        for name in signatures(src.read_text()):
            found[name] = src.name
    assert found == _cuda.KERNELS


def test_the_stand_in_rejects_wrong_argument_types(emu):
    out = to_device(np.zeros((2, 2, 2), np.float32))
    rest = [np.int32(0), np.int32(2)] * 3 + [np.float32(0.5)]
    with pytest.raises(TypeError, match="argument 1"):
        emu.launch("sg_lattice_uniform", 8, out, 1, np.uint32(2), *rest)
    with pytest.raises(TypeError, match="argument 0"):
        emu.launch("sg_lattice_uniform", 8, out.astype(np.float64), np.uint32(1), np.uint32(2),
                   *rest)  # fmt: skip
    with pytest.raises(TypeError, match="parameters"):
        emu.launch("sg_lattice_uniform", 8, out, np.uint32(1), *rest)
    emu.launch("sg_lattice_uniform", 8, out, np.uint32(1), np.uint32(2), *rest)
    assert np.all(out != 0)


def test_kernel_lattice_uniform(backend):
    be, dev = backend
    out = dev(np.full((5, 7, 9), np.nan, np.float32))
    be.launch("sg_lattice_uniform", out.size, out, np.uint32(123), np.uint32(456),
              np.int32(-3), np.int32(5), np.int32(4), np.int32(7), np.int32(-20), np.int32(9),
              np.float32(0.5))  # fmt: skip
    ref = k.lattice_uniform(123, 456, -3, 5, 4, 7, -20, 9, np.float32(0.5))
    np.testing.assert_array_equal(be.download(out), ref)


def test_kernel_band_axis(backend):
    be, dev = backend
    rng = np.random.default_rng(0)
    core = rng.standard_normal((6, 7, 8)).astype(np.float32)
    bands = []
    for n_in, m in ((6, 4), (7, 5), (8, 3)):
        kk = 3
        s = rng.integers(0, n_in - kk + 1, size=m).astype(np.int64)
        w = rng.standard_normal((m, kk)).astype(np.float32)
        bands.append((s, w))
    ref = k.band_contract3(core, *bands[0], *bands[1], *bands[2])
    x = dev(core)
    for a in (2, 1, 0):
        s, w = bands[a]
        shp = list(x.shape)
        shp[a] = len(s)
        out = dev(np.full(shp, np.nan, np.float32))
        be.launch("sg_band_axis", out.size, x, out, np.int32(x.shape[0]), np.int32(x.shape[1]),
                  np.int32(x.shape[2]), np.int32(a), dev(s), dev(w), np.int32(len(s)),
                  np.int32(w.shape[1]))  # fmt: skip
        x = out
    np.testing.assert_array_equal(be.download(x), ref)


def test_kernel_toeplitz_bands_match_the_cpu(backend):
    """The mask blur and the block-to-grid smoothing, as banded passes with zero padding."""
    be, dev = backend
    rng = np.random.default_rng(1)
    core = (rng.random((9, 4, 11)) > 0.5).astype(np.float32)
    kern = np.array([0.1, 0.2, 0.4, 0.2, 0.1, 0.05, 0.01], np.float32)
    offs, outs = (-3, -1, 2), (9, 6, 7)
    ref = k.toeplitz_contract3(core, offs[0], kern, outs[0], offs[1], kern, outs[1], offs[2],
                               kern, outs[2])  # fmt: skip
    x = dev(core)
    for a in range(3):
        s, w = _cuda._toeplitz_band(offs[a], kern, x.shape[a], outs[a])
        shp = list(x.shape)
        shp[a] = outs[a]
        out = dev(np.full(shp, np.nan, np.float32))
        be.launch("sg_band_axis", out.size, x, out, np.int32(x.shape[0]), np.int32(x.shape[1]),
                  np.int32(x.shape[2]), np.int32(a), dev(s), dev(w), np.int32(outs[a]),
                  np.int32(w.shape[1]))  # fmt: skip
        x = out
    np.testing.assert_array_equal(be.download(x), ref)


def test_kernel_block_sums(backend):
    be, dev = backend
    rng = np.random.default_rng(2)
    z = rng.standard_normal((4, 5, 6)).astype(np.float32)
    inv = [rng.random(n) + 0.5 for n in z.shape]
    ref = k.block_sums(z, *inv, 0.7, 0.05, 0.2, 11, 22, -2, 3, 5, 8.0)
    out = dev(np.full(z.shape, np.nan, np.float32))
    be.launch("sg_block_sums", out.size, dev(z), dev(inv[0]), dev(inv[1]), dev(inv[2]),
              np.float64(0.7), np.float64(0.05), np.float64(0.2), np.uint32(11), np.uint32(22),
              np.int32(-2), np.int32(3), np.int32(5), np.float64(8.0), np.int32(4), np.int32(5),
              np.int32(6), out)  # fmt: skip
    np.testing.assert_array_equal(be.download(out), ref)


def test_kernel_mask_bbox(backend):
    be, dev = backend
    rng = np.random.default_rng(3)
    for density in (0.0, 0.001, 0.3):
        m = (rng.random((13, 17, 19)) < density).astype(np.uint8)
        out = dev(np.array([13, -1, 17, -1, 19, -1, 0], np.int32))
        be.launch("sg_mask_bbox", m.size, dev(m), np.int32(13), np.int32(17), np.int32(19), out)
        got = tuple(int(v) for v in be.download(out))
        ref = k.mask_bbox(m)
        if ref[6] == 0:
            assert got[6] == 0
        else:
            assert got == tuple(int(v) for v in ref)


def test_kernel_shape_blend_apply_match_the_cpu(backend, small_phantom, organ_masks):
    """The fused shape, blend and apply kernels on a real tumor box, outputs poisoned."""
    from synthgen.rendering import _shape_inputs, tumor_box

    be, dev = backend
    ph = small_phantom
    mask = organ_masks["kidney_left"]
    plan = _plan(ph, mask, "kidney", 4, "large")
    t = plan.tumors[0]
    box = tumor_box(t, plan.spacing, plan.shape, plan.organ_bbox)
    pos = [(np.arange(box[a].start, box[a].stop) - t.center_vox[a]) * plan.spacing[a]
           for a in range(3)]  # fmt: skip
    ctrl, w, pos32, m = _shape_inputs(t, pos)
    orig = np.ascontiguousarray(ph.image[box], dtype=np.float32)
    organ = np.ascontiguousarray(mask[box])
    ref = np.empty(orig.shape, np.bool_)
    k.shape_mask(ctrl, *w, *pos32, m, organ, orig, np.float32(-np.inf), np.float32(np.inf),
                 False, ref)  # fmt: skip
    out = dev(np.full(orig.shape, 255, np.uint8))
    be.launch("sg_shape_mask", out.size, dev(ctrl), np.int32(ctrl.shape[1]),
              np.int32(ctrl.shape[2]), np.int32(ctrl.shape[3]),
              *[dev(np.asarray(x, np.float32)) for x in (*w, *pos32)], dev(m),
              dev(organ.view(np.uint8)), dev(orig), np.float32(-np.inf), np.float32(np.inf),
              np.int32(0), *[np.int32(n) for n in orig.shape], out)  # fmt: skip
    got = be.download(out)
    assert set(np.unique(got)) <= {0, 1}
    np.testing.assert_array_equal(got.astype(bool), ref)
    # blend: random blur and texture grid, delta starting from zero
    rng = np.random.default_rng(5)
    blur = (rng.random(orig.shape) * ref).astype(np.float32)
    g = rng.random((6, 7, 8)).astype(np.float32)
    ic = [
        k.interp_coords_nb(p, float(p[0]) - 1.0, 4.0, n) for p, n in zip(pos, g.shape, strict=True)
    ]
    d_ref = np.zeros(orig.shape, np.float32)
    k.blend_tumor(orig, organ, np.float32(-100), np.float32(300), blur, g, ic[0][0], ic[0][1],
                  ic[1][0], ic[1][1], ic[2][0], ic[2][1], np.float32(40.0), np.float32(120.0),
                  False, d_ref)  # fmt: skip
    d = dev(np.zeros(orig.shape, np.float32))
    be.launch("sg_blend_tumor", d.size, dev(orig), dev(organ.view(np.uint8)), np.float32(-100),
              np.float32(300), dev(blur), dev(g), np.int32(7), np.int32(8),
              dev(ic[0][0]), dev(ic[0][1]), dev(ic[1][0]), dev(ic[1][1]), dev(ic[2][0]),
              dev(ic[2][1]), np.float32(40.0), np.float32(120.0), np.int32(0),
              *[np.int32(n) for n in orig.shape], d)  # fmt: skip
    np.testing.assert_array_equal(be.download(d), d_ref)
    # apply: the output box is poisoned where delta == 0 only if the kernel wrote it
    tgt_ref = orig.copy()
    n_ref, acc_ref = k.apply_delta(tgt_ref, orig, d_ref, ref, -10.0, 400.0, -1024.0, 3071.0,
                                   True)  # fmt: skip
    tgt = dev(orig.copy())
    stats = dev(np.zeros(2, np.float64))
    be.launch("sg_apply_delta", tgt.size, tgt, dev(orig), dev(d_ref), dev(ref.view(np.uint8)),
              np.float32(-10.0), np.float32(400.0), np.float32(-1024.0), np.float32(3071.0),
              np.int32(1), np.int64(tgt.size), stats)  # fmt: skip
    np.testing.assert_array_equal(be.download(tgt), tgt_ref)
    st = be.download(stats)
    assert st[0] == n_ref and abs(st[1] - acc_ref) <= 1e-6 * max(1.0, abs(acc_ref))


@pytest.mark.parametrize("preset", ["liver-classic", "liver", "colon"])
def test_planning_reads_device_data_through_views(backend, small_phantom, organ_masks, preset):
    """A plan made from GPU-resident data (organ box reduced on the device, regions read
    back on demand) is the plan made from the host arrays."""
    be, dev = backend
    ph = small_phantom
    organ = "colon" if preset == "colon" else "liver"
    mask = organ_masks[organ]
    img_v, mask_v, idx = _cuda.host_views(be, dev(ph.image), dev(mask.astype(np.uint8)))
    ref_idx = synthgen.index_organ(mask)
    assert idx.bbox == ref_idx.bbox and idx.count == ref_idx.count
    for seed in (3, 4):
        a = synthgen.plan(img_v, mask_v, organ=preset, seed=seed, spacing=ph.spacing,
                          organ_index=idx)  # fmt: skip
        b = synthgen.plan(ph.image, mask, organ=preset, seed=seed, spacing=ph.spacing)
        assert a.to_json() == b.to_json()
    with pytest.raises(ValueError, match="organ mask is empty"):
        _cuda.host_views(be, dev(ph.image), dev(np.zeros(mask.shape, np.uint8)))


@pytest.mark.gpu
def test_synthesize_on_cupy_arrays(small_phantom, organ_masks):
    """The one-call API on CuPy data: plans from device views, renders on the GPU."""
    _gpu_backend()
    import cupy

    ph = small_phantom
    mask = organ_masks["liver"]
    img = cupy.asarray(ph.image)
    res = synthgen.synthesize(img, cupy.asarray(mask), organ="liver-classic", seed=8,
                              spacing=ph.spacing, out=img)  # fmt: skip
    ref = synthgen.synthesize(ph.image, mask, organ="liver-classic", seed=8, spacing=ph.spacing)
    assert res.image is img
    assert res.plan.to_json() == ref.plan.to_json()
    assert float(cupy.abs(img.astype(cupy.float64) - cupy.asarray(ref.image)).max()) <= 1.0


@pytest.mark.gpu
def test_torch_cuda_tensors_render_in_place_through_dlpack(small_phantom, organ_masks):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU for torch")
    _gpu_backend()
    ph = small_phantom
    mask = organ_masks["liver"]
    plan = _plan(ph, mask, "liver-classic", 21, "mix")
    img = torch.from_numpy(ph.image.copy()).cuda()
    m = torch.from_numpy(mask).cuda()
    ptr = img.data_ptr()
    res = synthgen.render(plan, img, m, out=img)  # device="auto": follows the tensors
    assert res.image is img and img.data_ptr() == ptr
    ref = synthgen.render(plan, ph.image, mask)
    got = img.cpu().numpy()
    assert np.abs(got.astype(float) - ref.image).max() <= 1.0
    assert isinstance(res.label, torch.Tensor) and res.label.is_cuda
    n = int(ref.tumor_mask.sum())
    assert np.count_nonzero((res.label.cpu().numpy() == 2) != (ref.label == 2)) <= 0.001 * n
    tm = res.tumor_mask
    assert tm.dtype == torch.bool and abs(int(tm.sum()) - n) <= 0.001 * n


# ---------------------------------------------------------------------------------------
# device selection (no GPU needed)
# ---------------------------------------------------------------------------------------


def test_parse_device() -> None:
    assert parse_device("cuda:1") == ("cuda", 1)
    assert parse_device("AUTO") == ("auto", None)
    for bad in ("gpu", "cpu:0", "cuda:", "cuda:x", 3):
        with pytest.raises(ValueError, match="device must be"):
            parse_device(bad)  # type: ignore[arg-type]


def test_auto_follows_the_data() -> None:
    a = np.zeros((2, 2, 2))
    assert str(resolve_device("auto", a)) == "cpu"
    assert str(resolve_device("cpu", a)) == "cpu"
    assert array_kind(a) == "numpy"


def test_cuda_without_a_usable_gpu_says_what_is_missing(small_phantom, organ_masks) -> None:
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        pytest.skip("CUDA is usable here")
    except ImportError:
        missing = "CuPy"
    except Exception:
        missing = "CUDA is not usable"
    ph = small_phantom
    with pytest.raises(DeviceError, match=missing):
        synthgen.synthesize(ph.image, organ_masks["liver"], organ="liver", seed=0,
                            spacing=ph.spacing, device="cuda")  # fmt: skip


def test_importing_synthgen_does_not_touch_cuda() -> None:
    code = (
        "import sys, synthgen, synthgen.rendering, synthgen.api\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupyx', 'torch')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
