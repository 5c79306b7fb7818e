"""Presets: built-ins load, liver-classic is the published table, files are validated."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

import synthgen
from synthgen.presets import (
    ORGANS,
    Preset,
    PresetError,
    SizeClass,
    default_preset_for,
    list_presets,
    load_preset,
    preset_from_dict,
)

BUILT_INS = {"colon", "esophagus", "kidney", "liver", "liver-classic", "pancreas", "uterus"}

MINIMAL = """\
name = "my-liver"
organ = "liver"

[classes.small]
count = [1, 2]
radius_mm = [4, 6]

[mix]
small = 1
"""


def _write(tmp_path: Path, text: str, name: str = "preset.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------- built-ins


def test_list_presets_names_every_built_in() -> None:
    assert set(list_presets()) == BUILT_INS
    assert list_presets() == sorted(list_presets())
    assert synthgen.list_presets() == list_presets()
    # every organ has a default preset of the same name
    for organ in ORGANS:
        assert default_preset_for(organ) == organ
        assert organ in list_presets()


@pytest.mark.parametrize("name", sorted(BUILT_INS))
def test_every_built_in_loads(name: str) -> None:
    p = load_preset(name)
    assert isinstance(p, Preset)
    assert p.name == name
    assert p.organ in ORGANS
    assert name.startswith(p.organ)
    assert p.path is not None and Path(p.path).name == f"{name}.toml"
    assert p.classes and p.mix
    assert set(p.mix) <= set(p.classes)
    assert sum(p.mix.values()) > 0
    assert p.sources, "built-in presets cite their sources"
    for c in p.classes.values():
        if c.composite:
            assert c.components
            assert all(not p.classes[k].composite for k in c.components)
        else:
            assert 1 <= c.count[0] <= c.count[1]
            assert 0 < c.radius_mm[0] <= c.radius_mm[1]
    # a preset is also accepted as is, and through the top-level API
    assert load_preset(p) is p
    assert synthgen.load_preset(name) == p


def test_organ_name_gives_its_default_preset() -> None:
    assert load_preset("liver").name == "liver"
    assert load_preset("liver") != load_preset("liver-classic")


def test_liver_classic_reproduces_published_table() -> None:
    p = load_preset("liver-classic")
    assert p.organ == "liver"
    expected = {
        # name: (count, radius, elastic sigma, sigma integer)
        "tiny": ((3, 10), (3.0, 5.0), (0.5, 1.0), False),
        "small": ((3, 10), (6.0, 10.0), (1.0, 2.0), True),
        "medium": ((2, 5), (12.0, 20.0), (3.0, 6.0), True),
        "large": ((1, 3), (24.0, 40.0), (5.0, 10.0), True),
    }
    assert set(p.classes) == {*expected, "mix"}
    for name, (count, radius, sigma, sigma_int) in expected.items():
        c = p.classes[name]
        assert c.count == count, name
        assert c.radius_mm == radius, name
        assert c.radius_integer is True, name
        assert c.elastic_sigma_mm == sigma, name
        assert c.elastic_sigma_integer is sigma_int, name
        assert not c.composite and not c.at_organ_center
        assert c.exophytic_probability == 0.0
    # radii are the integers in [0.75 r, 1.25 r] for r = 4, 8, 16, 32 mm
    for name, r in zip(("tiny", "small", "medium", "large"), (4, 8, 16, 32), strict=True):
        assert p.classes[name].radius_mm == (math.ceil(0.75 * r), math.floor(1.25 * r))
    mix = p.classes["mix"]
    assert mix.composite
    assert mix.components == {"tiny": (3, 10), "small": (5, 10), "medium": (2, 5), "large": (1, 3)}
    # each of tiny/small/medium/large/mix is equally likely
    assert p.mix == {"tiny": 1.0, "small": 1.0, "medium": 1.0, "large": 1.0, "mix": 1.0}

    tx = p.texture
    assert tx.sigma_a_mm == (3.0, 6.0, 9.0, 12.0, 15.0)
    assert tx.sigma_b_mm == (4.0, 7.0)
    assert tx.scale == (0.19, 0.21)
    assert tx.base == (0.04, 0.06)
    assert tx.u0 == (0.5, 0.55)
    assert tx.threshold == 0.12
    assert p.blend.sigma_mm == (1.0, 2.0)
    assert p.contrast.mode == "absolute"
    assert p.contrast.delta_hu == (65.0, 145.0)
    assert p.contrast.hyperdense_probability == 0.0
    assert p.placement.z_window == (0.3, 0.7)
    assert p.placement.widen == ((0.2, 0.8), (0.1, 0.9), (0.0, 1.0))
    assert p.placement.erosion_mm == 2.0
    assert p.placement.tissue_hu is None
    assert p.shape.control_points == 3
    assert p.shape.rotate is False  # axis-aligned ellipsoid
    assert p.shape.clip_to_organ is True


def test_liver_classic_plans_follow_the_table(small_phantom) -> None:
    """What plan() draws matches the table (integer radii, integer sigma, counts...)."""
    p = load_preset("liver-classic")
    liver = small_phantom.mask("liver")
    for size in ("tiny", "small", "medium", "large", "mix"):
        counts: dict[str, list[int]] = {}
        for seed in range(4):
            plan = synthgen.plan(
                small_phantom.image,
                liver,
                organ="liver-classic",
                seed=seed,
                spacing=small_phantom.spacing,
                size=size,
            )
            assert plan.size_class == size
            per: dict[str, int] = {}
            for t in plan.tumors:
                c = p.classes[t.size_class]
                per[t.size_class] = per.get(t.size_class, 0) + 1
                assert all(
                    r == int(r) and c.radius_mm[0] <= r <= c.radius_mm[1] for r in t.radii_mm
                )
                lo, hi = c.elastic_sigma_mm
                assert lo <= t.elastic_sigma_mm <= hi
                if c.elastic_sigma_integer:
                    assert t.elastic_sigma_mm == int(t.elastic_sigma_mm)
                assert np.asarray(t.displacement_mm).shape == (3, 3, 3, 3)
                assert t.rotation == tuple(np.eye(3).ravel())
                assert 1.0 <= t.blur_sigma_mm <= 2.0
                assert 65.0 <= t.contrast_hu <= 145.0
                assert t.clip_to_organ
                tx = t.texture
                assert tx["sigma_a_mm"] in (3, 6, 9, 12, 15)
                assert tx["sigma_b_mm"] in (4, 7)
                assert 0.19 <= tx["scale"] <= 0.21
                assert 0.04 <= tx["base"] <= 0.06
                assert 0.5 <= tx["u0"] <= 0.55
                assert tx["threshold"] == 0.12
            for name, n in per.items():
                rng = (
                    p.classes["mix"].components[name]  # type: ignore[index]
                    if size == "mix"
                    else p.classes[name].count
                )
                assert rng[0] <= n <= rng[1], (size, name, n)
            for name, n in per.items():
                counts.setdefault(name, []).append(n)
        if size == "mix":
            assert set(counts) == {"tiny", "small", "medium", "large"}
        else:
            assert set(counts) == {size}


def test_pancreas_sizes_fit_a_pancreas() -> None:
    pan = load_preset("pancreas")
    classic = load_preset("liver-classic")
    pan_max = max(c.radius_mm[1] for c in pan.classes.values() if not c.composite)
    liver_max = max(c.radius_mm[1] for c in classic.classes.values() if not c.composite)
    assert pan_max <= 0.6 * liver_max
    assert pan.classes["large"].radius_mm[1] < classic.classes["large"].radius_mm[0]
    assert pan.classes["large"].at_organ_center
    assert pan.placement.erosion_mm == 0.0


def test_hollow_organ_presets_never_touch_gas() -> None:
    for name in ("colon", "esophagus"):
        tissue = load_preset(name).placement.tissue_hu
        assert tissue is not None and tissue[0] >= -100.0, name


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(BUILT_INS))
def test_to_dict_round_trip(name: str) -> None:
    p = load_preset(name)
    d = p.to_dict()
    json.loads(json.dumps(d))  # plain JSON data
    q = preset_from_dict(d)
    assert q == dataclasses.replace(p, path=None)
    assert q.to_dict() == d
    # through JSON too (tuples become lists)
    assert preset_from_dict(json.loads(json.dumps(d))) == q


def test_a_plans_preset_is_read_only_and_its_copies_are_not(small_phantom) -> None:
    """Every plan of a preset holds the preset's own dictionary (no copy per plan): a change
    through one plan would change the preset and every later plan, so it is refused. Copies
    (to_dict, deepcopy, pickle, JSON) are plain and changeable."""
    import copy
    import pickle

    liver = small_phantom.mask("liver")

    def draw(seed: int):
        return synthgen.plan(
            small_phantom.image, liver, organ="liver", seed=seed, spacing=small_phantom.spacing
        )

    first = draw(0)
    before = draw(1)
    for change in (
        lambda d: d.__setitem__("organ", "kidney"),
        lambda d: d["blend"].update(sigma_mm=[9.0, 9.0]),
        lambda d: d["blend"]["sigma_mm"].__setitem__(0, 9.0),
        lambda d: d["blend"]["sigma_mm"].append(9.0),
        lambda d: d["classes"].pop("tiny"),
    ):
        with pytest.raises(TypeError, match="read-only"):
            change(first.preset)
    assert draw(1) == before
    for c in (
        first.to_dict()["preset"],
        copy.deepcopy(first.preset),
        pickle.loads(pickle.dumps(first)).preset,
        json.loads(first.to_json())["preset"],
        load_preset("liver").to_dict(),
    ):
        assert c == first.preset
        c["blend"]["sigma_mm"][0] = 9.0  # plain: no error
        assert c["blend"]["sigma_mm"][0] == 9.0
    assert first.preset["blend"]["sigma_mm"][0] != 9.0
    assert synthgen.Plan.from_dict(first.to_dict()) == first


def test_user_toml_by_path(tmp_path: Path, small_phantom) -> None:
    path = _write(tmp_path, MINIMAL, "my-liver.toml")
    for spec in (path, str(path)):
        p = load_preset(spec)
        assert p.name == "my-liver"
        assert p.path == str(path)
        assert p.classes == {"small": SizeClass(name="small", count=(1, 2), radius_mm=(4.0, 6.0))}
        # defaults are the published recipe
        assert p.texture == load_preset("liver-classic").texture
        assert p.contrast.delta_hu == (65.0, 145.0)
    # a path is read afresh each time (no stale cache after an edit)
    path.write_text(MINIMAL.replace("[4, 6]", "[5, 7]"), encoding="utf-8")
    assert load_preset(path).classes["small"].radius_mm == (5.0, 7.0)
    # and usable end to end
    liver = small_phantom.mask("liver")
    res = synthgen.synthesize(
        small_phantom.image, liver, organ=path, spacing=small_phantom.spacing, seed=1
    )
    assert res.plan.preset_name == "my-liver"
    assert 1 <= len(res.tumors) <= 2
    assert all(5.0 <= r <= 7.0 for t in res.tumors for r in t.radii_mm)
    assert res.tumor_mask.any()


# ---------------------------------------------------------------------------- invalid files


INVALID = [
    pytest.param("colour = 'red'\n" + MINIMAL, "top level", "colour", id="unknown-top-key"),
    pytest.param(
        MINIMAL.replace("radius_mm = [4, 6]", "radius_mm = [4, 6]\nradius = 3"),
        "classes.small",
        "radius",
        id="unknown-class-key",
    ),
    pytest.param(
        MINIMAL + "[texture]\nsigma_c_mm = [1]\n", "texture", "sigma_c_mm", id="unknown-texture-key"
    ),
    pytest.param(
        MINIMAL.replace("[4, 6]", "[6, 4]"), "classes.small.radius_mm", "above", id="inverted-range"
    ),
    pytest.param(
        MINIMAL + "[contrast]\ndelta_hu = [145, 65]\n",
        "contrast.delta_hu",
        "above",
        id="inverted-contrast",
    ),
    pytest.param(
        'name = "x"\norgan = "liver"\n[mix]\nsmall = 1\n',
        "top level",
        "classes",
        id="missing-classes",
    ),
    pytest.param(
        MINIMAL.replace("count = [1, 2]\n", ""), "classes.small", "count", id="missing-count"
    ),
    pytest.param(MINIMAL + "[mix]\nhuge = 1\n", None, "TOML", id="duplicate-table-bad-toml"),
    pytest.param("name = \n", None, "TOML", id="bad-toml"),
    pytest.param(
        MINIMAL.replace("small = 1", "small = 1\nhuge = 1"), "mix", "huge", id="mix-unknown-class"
    ),
    pytest.param(
        MINIMAL + "[classes.combo.components]\nsmall = [1, 2]\nhuge = [1, 1]\n",
        "classes.combo.components",
        "huge",
        id="composite-unknown-class",
    ),
    pytest.param(
        MINIMAL
        + "[classes.combo.components]\nsmall = [1, 2]\n"
        + "[classes.combo2.components]\ncombo = [1, 1]\n",
        "classes.combo2.components",
        "combo",
        id="composite-of-composite",
    ),
    pytest.param(
        MINIMAL + "[texture]\nbase = [0.5, 0.6]\nscale = [0.3, 0.5]\n",
        "texture",
        "base \\+ scale",
        id="base-plus-scale",
    ),
    pytest.param(
        MINIMAL.replace('organ = "liver"', 'organ = "lung"'), "organ", "lung", id="unknown-organ"
    ),
    pytest.param(
        MINIMAL + "[shape]\ncontrol_points = 12\n",
        "shape.control_points",
        "12",
        id="control-points",
    ),
    pytest.param(
        MINIMAL + "[contrast]\nmode = 'sometimes'\n", "contrast.mode", "sometimes", id="mode"
    ),
    pytest.param(MINIMAL.replace("small = 1", "small = 0"), "mix", "zero", id="mix-all-zero"),
    # integer draws from a range without an integer: refused on load, not "low >= high"
    # from the first plan
    pytest.param(
        MINIMAL.replace("radius_mm = [4, 6]", "radius_mm = [4.2, 4.8]\nradius_integer = true"),
        "classes.small.radius_mm",
        "no integer",
        id="integer-radius-without-integer",
    ),
    pytest.param(
        MINIMAL.replace(
            "radius_mm = [4, 6]",
            "radius_mm = [4, 6]\nelastic_sigma_mm = [0.2, 0.8]\nelastic_sigma_integer = true",
        ),
        "classes.small.elastic_sigma_mm",
        "no integer",
        id="integer-sigma-without-integer",
    ),
    # lengths without an upper bound: a 1e9 mm erosion allocated an exabyte (MemoryError) at
    # the first plan, a 1000 mm blur left labelled tumors that change no voxel
    pytest.param(
        MINIMAL + "[placement]\nerosion_mm = 1e9\n",
        "placement.erosion_mm",
        "<= 50",
        id="erosion-out-of-range",
    ),
    pytest.param(
        MINIMAL + "[blend]\nsigma_mm = [1000, 2000]\n",
        "blend.sigma_mm",
        "<= 20",
        id="blur-out-of-range",
    ),
    # a number where a table of the user's names belongs: a PresetError, not a TypeError
    # (the CLI's --preset printed a traceback)
    pytest.param(
        'name = "x"\norgan = "liver"\nclasses = 5\n[mix]\nsmall = 1\n',
        "classes",
        "must be a table, got int",
        id="classes-not-a-table",
    ),
    pytest.param(
        MINIMAL + "[classes.combo]\ncomponents = 5\n",
        "classes.combo.components",
        "must be a table, got int",
        id="components-not-a-table",
    ),
    pytest.param(
        MINIMAL.replace("radius_mm = [4, 6]", "radius_mm = [4, 6]\nwall_thickness_mm = [3, 5]"),
        "classes.small.wall_thickness_mm",
        "[wall]",
        id="class-wall-thickness-without-wall",
    ),
    pytest.param(
        MINIMAL.replace("radius_mm = [4, 6]", "radius_mm = [4, 6]\nwall_modes = {polypoid = 1}"),
        "classes.small.wall_modes",
        "[wall]",
        id="class-wall-modes-without-wall",
    ),
    pytest.param(
        MINIMAL + "[wall]\n[mass_effect]\nenabled = true\n",
        "mass_effect.enabled",
        "push no tissue",
        id="mass-effect-of-wall-tumors",
    ),
    pytest.param(
        MINIMAL.replace("radius_mm = [4, 6]", "radius_mm = [4, 6]\nwall_modes = {polyp = 1}")
        + "[wall]\n",
        "classes.small.wall_modes",
        "polyp",
        id="class-wall-modes-unknown-mode",
    ),
    pytest.param(
        MINIMAL.replace("radius_mm = [4, 6]", "radius_mm = [4, 6]\nwall_modes = {annular = 0}")
        + "[wall]\n",
        "classes.small.wall_modes",
        "zero",
        id="class-wall-modes-all-zero",
    ),
    pytest.param(
        MINIMAL.replace("count = [1, 2]", "count = [1.5, 2]"),
        "classes.small.count",
        "integers",
        id="non-integer-count",
    ),
]


@pytest.mark.parametrize(("text", "key", "word"), INVALID)
def test_invalid_file_names_file_and_key(tmp_path: Path, text: str, key, word: str) -> None:
    path = _write(tmp_path, text, "broken.toml")
    with pytest.raises(PresetError) as info:
        load_preset(path)
    msg = str(info.value)
    assert str(path) in msg
    if key is not None:
        assert f"[{key}]" in msg
    assert re.search(word, msg), msg
    assert isinstance(info.value, ValueError)


def test_invalid_dict_names_source() -> None:
    d = load_preset("liver-classic").to_dict()
    d["classes"]["tiny"]["radius_mm"] = [5, 3]
    with pytest.raises(PresetError, match=r"my plan: \[classes\.tiny\.radius_mm\]"):
        preset_from_dict(d, source="my plan")


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_preset(tmp_path / "nope.toml")


@pytest.mark.parametrize("spec", ["lung", "liver-modern", "Liver"])
def test_unknown_name_lists_valid_names(spec: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(spec))) as info:
        load_preset(spec)
    for name in BUILT_INS:
        assert name in str(info.value)


def test_unknown_organ_for_default_preset() -> None:
    with pytest.raises(ValueError, match="valid organs") as info:
        default_preset_for("lung")
    assert all(o in str(info.value) for o in ORGANS)


def test_unknown_size_class_lists_valid_names() -> None:
    p = load_preset("kidney")
    with pytest.raises(ValueError, match="no size class 'mix'") as info:
        p.size_class("mix")
    assert "tiny, small, medium, large" in str(info.value)
    assert p.size_class("large").name == "large"


def test_a_plan_of_a_wall_preset_with_mass_effect_stays_replayable() -> None:
    """A preset file with [wall] and mass effect is refused (it did nothing), but a plan's
    preset dict may hold both (batch --mass-effect turned it on for every organ before it
    left wall presets alone): it still reads back, so such plans replay and resume."""
    d = load_preset("colon").to_dict()
    d["mass_effect"] = {**d.get("mass_effect", {}), "enabled": True}
    p = preset_from_dict(d, source="an old plan")
    assert p.wall is not None and p.mass_effect.enabled
