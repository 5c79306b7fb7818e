"""The organ presets are grounded: their numbers follow the facts of shared/REFERENCE.md
(sections 2 and 3), every number carries a source note, and what the engine draws and renders
on the phantom stays inside each preset's ranges."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest

import synthgen
from synthgen.mass_effect import prepare_render
from synthgen.presets import Preset, load_preset, preset_from_dict, preset_path

ORGAN_PRESETS = ("liver", "pancreas", "kidney", "colon", "esophagus", "uterus")
SOLID = ("liver", "pancreas", "kidney", "uterus")
HOLLOW = ("colon", "esophagus")
# Largest liver lesion <1 cm / 1-2 cm / 2-5 cm / >=5 cm in this many patients (REFERENCE 3).
LIVER_ATLAS = {"tiny": 206, "small": 399, "medium": 508, "large": 357}
# The texture's mean is about 0.5 (REFERENCE 2): the mean drop over a tumor is about D / 2.
TEXTURE_MEAN = 0.5
# Measured on the phantom pancreas: mean drop / D of non-tiny tumors, 0.43-0.49.
PANCREAS_DROP_RATIO = 0.46


def _plain(p: Preset) -> dict:
    return {n: c for n, c in p.classes.items() if not c.composite}


def _by_size(p: Preset) -> list[str]:
    return sorted(_plain(p), key=lambda n: p.classes[n].radius_mm)


def _d_range(p: Preset, organ_hu: float | None) -> tuple[float, float]:
    """The |D| a preset can draw on an organ of ``organ_hu`` (relative mode) or at all."""
    c = p.contrast
    if c.mode == "absolute":
        return c.delta_hu
    lo, hi = (float(np.clip(f * (organ_hu - c.reference_hu), *c.delta_hu)) for f in c.fraction)
    return lo, hi


# ------------------------------------------------------------------------- source notes


def _numeric_lines(text: str):
    """(table, key, line, table_documented) of every numeric key line of a preset file.

    A table is documented when a comment stands just above its header, on it, or before its
    first key."""
    table, documented, pending_comment = "", False, False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            pending_comment = True
            continue
        m = re.match(r"^\[([^\]]+)\]\s*(#.*)?$", line)
        if m:
            table = m.group(1)
            documented = pending_comment or m.group(2) is not None
            pending_comment = False
            continue
        if pending_comment and table:
            documented = True
        pending_comment = False
        km = re.match(r"^([A-Za-z_]+)\s*=\s*(.*)$", line)
        if km and re.match(r"^[\[\-\d.]", km.group(2)):
            yield table, km.group(1), raw, documented


@pytest.mark.parametrize("name", ORGAN_PRESETS)
def test_every_number_has_a_source_note(name: str) -> None:
    """Size-class and contrast numbers carry an inline note citing REFERENCE section 2/3 or
    saying it is a design choice; every other table has a note block."""
    text = preset_path(name).read_text(encoding="utf-8")
    seen = 0
    composite = {t for t in re.findall(r"^\[classes\.([^.\]]+)\.components\]", text, flags=re.M)}
    for table, key, raw, documented in _numeric_lines(text):
        seen += 1
        strict = table == "contrast" or (
            table.startswith("classes.") and table.split(".")[1] not in composite
        )
        if strict and key != "mode":
            assert "#" in raw, f"{name}: [{table}] {key} has no source note: {raw!r}"
            note = raw.split("#", 1)[1]
            assert re.search(r"\bR[23]\b|REFERENCE|design", note), (
                f"{name}: [{table}] {key}: the note cites neither REFERENCE nor design: {raw!r}"
            )
        elif table.split(".")[0] in {"classes", "mix", "texture", "blend", "placement", "shape"}:
            assert documented or "#" in raw, f"{name}: [{table}] {key} has no source note"
    assert seen > 10
    # the header explains the notation and the sources list cites the REFERENCE sections
    assert "REFERENCE.md" in text.split("name =", 1)[0]
    sources = load_preset(name).sources
    assert len(sources) >= 3, name
    assert any("REFERENCE section 3" in s for s in sources), name
    assert any("REFERENCE section 2" in s for s in sources), name
    assert any("design" in s.lower() for s in sources), "design choices are declared"


def test_source_note_check_can_fail() -> None:
    text = (
        "[classes.tiny]\ncount = [1, 2]\nradius_mm = [2, 3]   # R3\n"
        "[contrast]\nfraction = [0.1, 1]\n"
    )
    lines = list(_numeric_lines(text))
    assert [(t, k) for t, k, _, _ in lines] == [
        ("classes.tiny", "count"),
        ("classes.tiny", "radius_mm"),
        ("contrast", "fraction"),
    ]
    assert ["#" in raw for _, _, raw, _ in lines] == [False, True, False]
    assert not any(d for _, _, _, d in lines)


# ------------------------------------------------------------------------- contrast modes


def test_solid_organs_use_contrast_relative_to_the_organ(small_phantom) -> None:
    """Per-scan organ HU spans ~150 HU (REFERENCE 3): solid organs measure their organ."""
    for name in SOLID:
        c = load_preset(name).contrast
        assert c.mode == "relative", name
        assert c.reference_hu == 0.0 and 0.0 < c.fraction[0] < c.fraction[1], name
        assert 0.0 < c.delta_hu[0] < c.delta_hu[1], name
    # Hollow organs cannot: their mask's median is lumen content, not wall (REFERENCE 3).
    for name in HOLLOW:
        p = load_preset(name)
        assert p.contrast.mode == "absolute", name
        assert p.placement.tissue_hu is not None, name
        m = small_phantom.mask(name)
        assert np.median(small_phantom.image[m]) < -100 or name == "esophagus"
        wall = m & (small_phantom.image >= p.placement.tissue_hu[0])
        assert 0.05 * m.sum() < wall.sum() < m.sum()


def test_liver_contrast_is_the_published_one_on_the_benchmark_liver() -> None:
    """D 65-145 HU on the 100 HU benchmark liver (REFERENCE 2); ~90% hypodense (REFERENCE 3)."""
    p = load_preset("liver")
    assert _d_range(p, 100.0) == pytest.approx((65.0, 145.0))
    assert p.contrast.delta_hu[1] == load_preset("liver-classic").contrast.delta_hu[1]
    assert p.contrast.hyperdense_probability == pytest.approx(0.10)


# --------------------------------------------------------------------------- size facts


def test_liver_classes_are_the_atlas_size_bins() -> None:
    """Largest lesion <1 / 1-2 / 2-5 / >=5 cm (REFERENCE 3): diameters 2 r in those bins."""
    p = load_preset("liver")
    assert _by_size(p) == ["tiny", "small", "medium", "large"]
    bins_mm = {"tiny": (0, 10), "small": (10, 20), "medium": (20, 50), "large": (50, math.inf)}
    for name, (lo, hi) in bins_mm.items():
        r = p.classes[name].radius_mm
        assert lo <= 2 * r[0] and 2 * r[1] <= hi, name
    # contiguous: no diameter falls between two classes
    names = _by_size(p)
    for a, b in itertools.pairwise(names):
        assert p.classes[a].radius_mm[1] == p.classes[b].radius_mm[0]


def _largest_class_distribution(p: Preset) -> dict[str, float]:
    """Probability of each plain class being a sample's largest, from the mix (exact)."""
    order = _by_size(p)
    total = sum(p.mix.values())
    out = dict.fromkeys(order, 0.0)
    for name, w in p.mix.items():
        c = p.classes[name]
        if not c.composite:
            out[name] += w / total
            continue
        p_zero = {
            k: (1.0 / (hi - lo + 1) if lo == 0 else 0.0) for k, (lo, hi) in c.components.items()
        }
        rest = 1.0  # probability that every bigger class drew zero tumors
        for k in reversed(order):
            if k in c.components:
                out[k] += w / total * rest * (1.0 - p_zero[k])
                rest *= p_zero[k]
        assert rest == 0.0, "a composite sample always has a tumor"
    return out


def test_liver_mix_keeps_the_atlas_largest_lesion_proportions() -> None:
    p = load_preset("liver")
    got = _largest_class_distribution(p)
    n = sum(LIVER_ATLAS.values())
    for name, k in LIVER_ATLAS.items():
        assert got[name] == pytest.approx(k / n, abs=1e-9), (name, got)
    # the check can fail: the former weights (mix on top of the raw counts) skew it
    d = p.to_dict()
    d["mix"].update(medium=508, large=357)
    skewed = _largest_class_distribution(preset_from_dict(d))
    assert abs(skewed["large"] - 357 / n) > 0.02


def test_liver_plans_follow_the_atlas(small_phantom) -> None:
    """What plan() draws: the largest lesion's class follows 206/399/508/357."""
    liver = small_phantom.mask("liver")
    idx = synthgen.index_organ(liver)
    rank = {n: i for i, n in enumerate(_by_size(load_preset("liver")))}
    hits = dict.fromkeys(LIVER_ATLAS, 0)
    n_samples = 300
    for seed in range(n_samples):
        plan = synthgen.plan(
            small_phantom.image, liver, organ="liver", seed=seed, spacing=small_phantom.spacing,
            organ_index=idx,
        )  # fmt: skip
        hits[max((t.size_class for t in plan.tumors), key=rank.__getitem__)] += 1
    n = sum(LIVER_ATLAS.values())
    for name, k in LIVER_ATLAS.items():
        p = k / n
        sd = math.sqrt(p * (1 - p) / n_samples)
        assert abs(hits[name] / n_samples - p) < 4 * sd + 1e-9, (name, hits)


def test_pancreas_sizes_are_pdac_sizes() -> None:
    """Mean PDAC 30 mm, iso-attenuating 12 mm (REFERENCE 3); a 2-3 cm thick organ."""
    p = load_preset("pancreas")
    classic = load_preset("liver-classic")
    largest = max(c.radius_mm[1] for c in _plain(p).values())
    assert largest <= 20.0  # 40 mm across at most
    assert largest < min(classic.classes["large"].radius_mm)  # the liver radii fill it
    lo, hi = p.classes["large"].radius_mm
    assert lo <= 15.0 <= hi  # the 30 mm mean tumor
    lo, hi = p.classes["small"].radius_mm
    assert lo <= 6.0 <= hi  # the 12 mm iso-attenuating tumor
    assert p.classes["large"].at_organ_center  # diffusion-era rule (REFERENCE 2)
    # early : medium : large = 0.8 : 0.1 : 0.1 (REFERENCE 2)
    w = {k: v / sum(p.mix.values()) for k, v in p.mix.items()}
    assert w["tiny"] + w["small"] == pytest.approx(0.8)
    assert w["medium"] == pytest.approx(0.1) and w["large"] == pytest.approx(0.1)


def _organ_fraction(ph, preset, seeds) -> np.ndarray:
    m = ph.mask("pancreas")
    out = []
    for seed in seeds:
        res = synthgen.synthesize(
            ph.image, m, organ=preset, seed=seed, spacing=ph.spacing, size="large"
        )
        out.append(res.tumor_mask.sum() / m.sum())
    return np.array(out)


def test_pancreas_large_tumors_fit_the_phantom_pancreas(small_phantom) -> None:
    """Large pancreas tumors take a bounded share of the organ; liver radii would not."""
    seeds = range(10)
    frac = _organ_fraction(small_phantom, "pancreas", seeds)
    assert frac.min() > 0.01  # not empty: the bbox centre is pancreas
    assert frac.max() < 0.2 and np.median(frac) < 0.12, frac
    d = load_preset("pancreas").to_dict()
    d["classes"]["large"]["radius_mm"] = list(
        load_preset("liver-classic").classes["large"].radius_mm
    )
    liver_sized = _organ_fraction(small_phantom, preset_from_dict(d), seeds)
    assert np.median(liver_sized) > 0.2, liver_sized  # the bound above can fail


def test_pancreas_contrast_follows_the_published_figures() -> None:
    """On a 112-128 HU pancreatic-phase pancreas (REFERENCE 3) the mean drop (~0.46 D: the
    texture mean ~0.5 less the blurred edge) centres on the 39-41 HU portal-venous contrast,
    reaches the 60-67 HU pancreatic-phase one, and 5-14% of tumors are iso-attenuating (mean
    drop under ~12 HU)."""
    p = load_preset("pancreas")
    c = p.contrast
    assert c.hyperdense_probability == 0.0  # PDAC is hypoattenuating
    lo, hi = c.fraction
    for organ in (112.0, 120.0, 128.0):
        d_lo, d_hi = _d_range(p, organ)
        assert 60.0 <= TEXTURE_MEAN * d_hi <= 70.0, organ
        assert PANCREAS_DROP_RATIO * d_lo <= 12.0, organ
    median_drop = PANCREAS_DROP_RATIO * 0.5 * (lo + hi) * 120.0
    assert 38.0 <= median_drop <= 42.0, median_drop
    f_iso = 12.0 / (PANCREAS_DROP_RATIO * 120.0)
    iso_share = (f_iso - lo) / (hi - lo)
    assert 0.05 <= iso_share <= 0.14, iso_share


def test_kidney_facts() -> None:
    p = load_preset("kidney")
    # small renal masses < 4 cm (REFERENCE 3): every class up to medium, large beyond
    assert p.classes["medium"].radius_mm[1] == 20.0
    assert p.classes["large"].radius_mm[0] >= 20.0
    # exophytic growth: medium/large unclipped half of the time (REFERENCE 2, 3)
    for name in ("medium", "large"):
        assert p.classes[name].exophytic_probability == 0.5
    assert p.shape.clip_to_organ is True
    # clear-cell carcinoma hyperenhancing early, most hypo (REFERENCE 3)
    assert 0.0 < p.contrast.hyperdense_probability < 0.5
    assert p.contrast.max_hu <= 255.0  # the brightest per-scan kidney median
    assert p.placement.erosion_mm == 0.0  # diffusion-era rule (REFERENCE 2)


def test_kidney_plans_draw_exophytic_and_hyperdense_tumors(small_phantom) -> None:
    p = load_preset("kidney")
    kid = small_phantom.mask("kidney")
    unclipped, hyper, n_big, n_all = 0, 0, 0, 0
    for seed in range(200):
        plan = synthgen.plan(
            small_phantom.image, kid, organ="kidney", seed=seed, spacing=small_phantom.spacing,
            size=("tiny", "small", "medium", "large")[seed % 4],
        )  # fmt: skip
        for t in plan.tumors:
            n_all += 1
            hyper += t.contrast_hu < 0
            if p.classes[t.size_class].exophytic_probability > 0:
                n_big += 1
                unclipped += not t.clip_to_organ
            else:
                assert t.clip_to_organ
    assert n_big >= 80
    assert abs(unclipped / n_big - 0.5) < 4 * math.sqrt(0.25 / n_big)
    q = p.contrast.hyperdense_probability
    assert abs(hyper / n_all - q) < 4 * math.sqrt(q * (1 - q) / n_all)


def test_esophagus_classes_follow_the_wall_thresholds() -> None:
    """Normal wall < 5 mm, > 10 mm suspicious, 13.5 mm separates malignant (REFERENCE 3)."""
    p = load_preset("esophagus")
    assert _by_size(p) == ["tiny", "small", "medium", "large"]
    diam = {n: tuple(2 * r for r in p.classes[n].radius_mm) for n in _by_size(p)}
    assert diam["tiny"] == (5.0, 10.0)
    assert diam["small"] == (10.0, 13.5)
    assert diam["medium"][0] == 13.5
    assert diam["large"][0] == diam["medium"][1]


def test_uterus_classes_follow_the_flag_threshold() -> None:
    """Intrauterine hypodensity >= 19.5 mm is flagged (REFERENCE 3); hypodense only."""
    p = load_preset("uterus")
    assert 2 * p.classes["small"].radius_mm[1] == 19.5
    assert 2 * p.classes["medium"].radius_mm[0] == 19.5
    assert p.contrast.hyperdense_probability == 0.0


def test_colon_segment_is_short() -> None:
    """Wall thickening over a short segment (< 10 cm, REFERENCE 3)."""
    p = load_preset("colon")
    assert 2 * max(c.radius_mm[1] for c in _plain(p).values()) < 100.0


def test_colon_classes_grow_with_the_class(small_phantom) -> None:
    """A colon class bounds the lesion, not only its segment's length: thickness and mode
    come per class (a tiny lesion is a 6-10 mm polyp or a thin focal thickening, the annular
    apple core a large one). With one [wall] range and mode mix for every class, the tiny
    lesions of these seeds measured 11-26 mL on this phantom."""
    p = load_preset("colon")
    assert p.classes["tiny"].wall_modes["polypoid"] >= 0.5
    assert max(p.classes["large"].wall_modes, key=p.classes["large"].wall_modes.get) == "annular"
    m = small_phantom.mask("colon")
    voxel_ml = float(np.prod(small_phantom.spacing)) / 1000.0
    medians = []
    for size in ("tiny", "small", "medium", "large"):
        vols = []
        for seed in range(8):
            res = synthgen.synthesize(small_phantom.image, m, organ="colon", seed=seed,
                                      spacing=small_phantom.spacing, size=size)  # fmt: skip
            vols.append(int(res.tumor_mask.sum()) * voxel_ml)
        if size == "tiny":
            assert max(vols) < 6.0, vols
        medians.append(float(np.median(vols)))
    assert medians == sorted(medians), medians


@pytest.mark.parametrize("name", ORGAN_PRESETS)
def test_class_radii_are_ordered_and_contiguous(name: str) -> None:
    p = load_preset(name)
    names = _by_size(p)
    assert names == ["tiny", "small", "medium", "large"]
    for a, b in itertools.pairwise(names):
        assert p.classes[a].radius_mm[1] == p.classes[b].radius_mm[0], (name, a, b)
        assert p.classes[a].elastic_sigma_mm[0] <= p.classes[b].elastic_sigma_mm[0]
    for c in _plain(p).values():
        # the elastic sigma stays well below the radius (a tumor, not a splash)
        assert c.elastic_sigma_mm[1] <= 0.5 * c.radius_mm[1], (name, c.name)


# -------------------------------------------------------- rendered tumors on the phantom


@pytest.mark.parametrize("name", ORGAN_PRESETS)
def test_rendered_tumors_stay_in_the_preset_ranges(small_phantom, name: str) -> None:
    """20 seeds per organ: counts, radii, contrast draws and measured contrast all inside
    the preset's ranges."""
    p = load_preset(name)
    m = small_phantom.mask(name)
    img = small_phantom.image
    classes = _by_size(p)
    ratios, measured = [], []
    for seed in range(20):
        size = classes[seed % len(classes)]
        res = synthgen.synthesize(
            img, m, organ=name, seed=seed, spacing=small_phantom.spacing, size=size
        )
        cls = p.classes[size]
        assert cls.count[0] <= len(res.tumors) <= cls.count[1]
        d_lo, d_hi = _d_range(p, res.plan.organ_hu)
        live = [t for t in res.tumors if t.box]
        if p.wall is not None:
            # Hollow organ: wall tumors replace lumen content with tissue (no D; the HU, the
            # measured thickness and the label are checked in tests/test_hollow.py).
            lo, hi = cls.wall_thickness_mm or p.wall.thickness_mm
            for t, rec in zip(res.plan.tumors, res.tumors, strict=True):
                assert t.kind == "wall" and t.contrast_hu == 0.0
                assert lo <= t.wall["thickness_mm"] <= hi
                assert p.wall.tissue_hu[0] <= t.wall["tissue_hu"] <= p.wall.tissue_hu[1]
                assert all(cls.radius_mm[0] <= r <= cls.radius_mm[1] for r in rec.radii_mm)
            continue
        for t in res.tumors:
            assert t.size_class == size
            assert all(cls.radius_mm[0] <= r <= cls.radius_mm[1] for r in t.radii_mm)
            assert d_lo - 1e-6 <= abs(t.contrast_hu) <= d_hi + 1e-6
            if p.contrast.hyperdense_probability == 0:
                assert t.contrast_hu > 0
        # the scan the tumors were blended into: pushed by the mass effect, if any
        pre = prepare_render(res.plan, img, m).image
        for t, (box, mask) in zip(live, res.boxes, strict=True):
            if not t.voxels:
                continue
            new = res.image[box][mask].astype(np.float64)
            old = pre[box][mask].astype(np.float64)
            # never pushed past the preset's HU bounds
            assert np.all((new >= p.contrast.min_hu - 1e-3) | (new >= old))
            assert np.all((new <= p.contrast.max_hu + 1e-3) | (new <= old))
            # the plain blend's contrast (rim, necrotic core and specks move the mean on
            # purpose: measured in tests/test_appearance.py)
            if t.clipped and not res.plan.tumors[t.index].appearance:
                assert np.sign(t.mean_contrast_hu) in (0, np.sign(t.contrast_hu))
                assert abs(t.mean_contrast_hu) <= abs(t.contrast_hu) + 1e-6
                if size != "tiny":  # the blur eats tiny tumors (REFERENCE 2)
                    ratios.append(t.mean_contrast_hu / t.contrast_hu)
                    measured.append((abs(t.mean_contrast_hu), d_lo, d_hi))
    if p.wall is not None:
        return
    assert len(ratios) >= 10
    # the mean change over a tumor is about D / 2 (texture mean ~0.5, REFERENCE 2) ...
    assert 0.35 <= float(np.median(ratios)) <= 0.6, np.median(ratios)
    assert min(ratios) >= 0.2
    # ... so the measured contrast sits in the preset's range, halved
    for c, d_lo, d_hi in measured:
        assert 0.2 * d_lo <= c <= 0.65 * d_hi, (c, d_lo, d_hi)


def test_rendered_pancreas_contrast_in_the_pancreatic_phase(small_phantom) -> None:
    """The phantom pancreas raised to 120 HU (pancreatic phase, REFERENCE 3): rendered
    tumors are 39-41 HU darker at the median, 60-67 HU at the top (90th percentile), and
    about 5-14% iso-attenuating."""
    m = small_phantom.mask("pancreas")
    img = small_phantom.image.astype(np.int16)
    img[m] += 120 - int(np.median(img[m]))
    drops = []
    for seed in range(90):
        size = ("small", "medium", "large")[seed % 3]
        res = synthgen.synthesize(
            img, m, organ="pancreas", seed=seed, spacing=small_phantom.spacing, size=size
        )
        assert res.plan.organ_hu == pytest.approx(120.0, abs=2)
        drops += [t.mean_contrast_hu for t in res.tumors if t.voxels]
    drops = np.array(drops)
    assert drops.size >= 90
    assert 34.0 <= np.median(drops) <= 46.0, np.median(drops)  # 39-41 HU
    assert 55.0 <= np.percentile(drops, 90) <= 70.0  # pancreatic phase 60-67 HU
    assert drops.max() <= 0.6 * load_preset("pancreas").contrast.delta_hu[1]
    iso = np.mean(drops < 12.0)
    assert 0.02 < iso < 0.2, iso  # 5-14% iso-attenuating


# ------------------------------------------------------------------------ several organs


def test_presets_mix_on_one_scan(small_phantom) -> None:
    """Several organ presets on one scan: each organ's tumors land in its own organ and a
    later organ leaves earlier tumors alone."""
    img = small_phantom.image
    masks = {o: small_phantom.mask(o) for o in ("liver", "pancreas", "uterus")}
    union = np.zeros(img.shape, dtype=bool)
    for k, (organ, m) in enumerate(masks.items()):
        res = synthgen.synthesize(
            img, m, organ=organ, seed=k, spacing=small_phantom.spacing, size="medium"
        )
        tm = res.tumor_mask
        assert tm.any() and not (tm & ~m).any(), organ
        changed = res.image != img
        assert not (changed & union).any(), "a later organ changed an earlier organ's tumor"
        assert res.plan.preset_name == organ
        img, union = res.image, union | tm
    for organ, m in masks.items():
        assert (union & m).any(), organ
