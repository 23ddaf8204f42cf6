"""Bring your own features: CLAM and Trident HDF5 files -> a scores file (``zeus score``)."""

from __future__ import annotations

import numpy as np
import pytest

from zeus_qupath.errors import ModelError, ZeusError
from zeus_qupath.features import read_feature_file, score_features, unit_features
from zeus_qupath.outputs import PatchScores
from zeus_qupath.prompts import class_prototypes, load_prompts
from zeus_qupath.scoring import cosine_scores

h5py = pytest.importorskip("h5py")

N = 10


@pytest.fixture(scope="module")
def prompts(spindle_prompts):
    return load_prompts(spindle_prompts)


@pytest.fixture(scope="module")
def raw_features(tiny_encoder):
    """Tiny-model features of known patches, scaled by arbitrary lengths (files need not hold unit vectors)."""
    pixels = np.random.default_rng(5).integers(0, 256, (N, 448, 448, 3), dtype=np.uint8)
    unit = tiny_encoder.encode_images(pixels)
    scale = np.random.default_rng(6).uniform(0.5, 20.0, (N, 1)).astype(np.float32)
    return unit, unit * scale


@pytest.fixture(scope="module")
def expected(tiny_encoder, prompts, raw_features):
    return cosine_scores(raw_features[0], class_prototypes(tiny_encoder, prompts))


def grid_coords(step: int, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    xs = np.arange(N) % 5
    ys = np.arange(N) // 5
    return np.stack([origin[0] + xs * step, origin[1] + ys * step * 2], axis=1)


def write_trident(path, features, coords, *, encoder="zeus-tiny", dtype=np.float32, **attrs):
    """Trident's layout (``trident.IO.save_h5`` / ``coords_to_h5``): chunked, resizable datasets with attributes."""
    coords_attrs = {"patch_size": 224, "patch_size_level0": 448, "level0_magnification": 40,
                    "target_magnification": 20, "overlap": 168, "name": "slide", "savetodir": "out",
                    "level0_width": 3000, "level0_height": 2000, **attrs}
    with h5py.File(path, "w") as f:
        for key, val, at in (("features", features.astype(dtype), {"name": "slide", "savetodir": "out",
                                                                    "encoder": encoder}),
                             ("coords", coords.astype(np.int64), coords_attrs)):
            d = f.create_dataset(key, data=val, chunks=(1,) + val.shape[1:] if len(val) else None,
                                 maxshape=(None,) + val.shape[1:])
            for k, v in at.items():
                if v is not None:
                    d.attrs[k] = v
    return path


def write_clam(path, features, coords, coords_attrs=None):
    """CLAM's ``extract_features_fp.py`` layout: ``features`` float32 and ``coords`` int32, no attributes."""
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features.astype(np.float32), maxshape=(None, features.shape[1]))
        d = f.create_dataset("coords", data=coords.astype(np.int32), maxshape=(None, 2))
        for k, v in (coords_attrs or {}).items():
            d.attrs[k] = v
    return path


def test_trident_layout(tmp_path, tiny_encoder, prompts, raw_features, expected):
    coords = grid_coords(112)
    path = write_trident(tmp_path / "slide.h5", raw_features[1], coords)
    ps = score_features(path, tiny_encoder, prompts)
    assert isinstance(ps, PatchScores)
    np.testing.assert_allclose(ps.scores, expected, atol=1e-6)
    np.testing.assert_array_equal(ps.coords, coords)
    assert (ps.patch_size, ps.stride, ps.width, ps.height, ps.mpp) == (448, 112, 3000, 2000, None)
    assert ps.classes == ("normal", "tumor") and ps.positive_class == "tumor"
    assert ps.meta["layout"] == "trident" and ps.meta["warnings"] == []
    assert ps.meta["stride_from"] == "attributes patch_size_level0 - overlap"
    assert ps.meta["prompts_sha256"] == prompts.sha256 and ps.meta["models"] == [tiny_encoder.name]
    ps.save(tmp_path / "slide.scores.npz")
    back = PatchScores.load(tmp_path / "slide.scores.npz")
    np.testing.assert_array_equal(back.scores, ps.scores)
    assert back.meta["features_file"] == "slide.h5"


def test_trident_half_precision_and_overrides(tmp_path, tiny_encoder, prompts, raw_features, expected):
    path = write_trident(tmp_path / "fp16.h5", raw_features[0], grid_coords(224), dtype=np.float16)
    ps = score_features(path, tiny_encoder, prompts, patch_size=448, stride=224, width=5000, height=4000, mpp=0.5)
    np.testing.assert_allclose(ps.scores, expected, atol=2e-3)  # fp16 storage
    assert (ps.patch_size, ps.stride, ps.width, ps.height, ps.mpp) == (448, 224, 5000, 4000, 0.5)
    assert ps.meta["patch_size_from"] == "argument" and ps.meta["size_from"] == "arguments"


def test_clam_feature_file(tmp_path, tiny_encoder, prompts, raw_features, expected):
    coords = grid_coords(256)
    path = write_clam(tmp_path / "clam.h5", raw_features[1], coords)
    with pytest.raises(ZeusError, match="--patch-size") as exc:
        score_features(path, tiny_encoder, prompts)
    assert "\n" not in str(exc.value)
    ps = score_features(path, tiny_encoder, prompts, patch_size=256)
    np.testing.assert_allclose(ps.scores, expected, atol=1e-6)
    assert ps.stride == 256 and ps.meta["layout"] == "no attributes"
    # no size in the file: the bounding box of the patches, said so
    assert (ps.width, ps.height) == (4 * 256 + 256, 2 * 256 + 256)
    assert ps.meta["size_from"] == "bounding box of the patches" and "bounding box" in ps.meta["warnings"][0]
    ps = score_features(path, tiny_encoder, prompts, patch_size=256, width=9000, height=7000)
    assert (ps.width, ps.height) == (9000, 7000) and ps.meta["warnings"] == []


def test_clam_patch_attributes(tmp_path, tiny_encoder, prompts, raw_features, expected):
    attrs = {"patch_size": 256, "patch_level": 0, "downsample": np.array([1.0, 1.0]),
             "downsampled_level_dim": np.array([4000, 3000]), "level_dim": np.array([4000, 3000]), "name": "s"}
    path = write_clam(tmp_path / "clam_attrs.h5", raw_features[1], grid_coords(256), attrs)
    ps = score_features(path, tiny_encoder, prompts)
    np.testing.assert_allclose(ps.scores, expected, atol=1e-6)
    assert (ps.patch_size, ps.stride, ps.width, ps.height) == (256, 256, 4000, 3000)
    assert ps.meta["layout"] == "clam"
    attrs.update(patch_level=1, downsample=np.array([2.0, 2.0]))
    path = write_clam(tmp_path / "clam_level1.h5", raw_features[1], grid_coords(512), attrs)
    assert score_features(path, tiny_encoder, prompts, width=8000, height=6000).patch_size == 512


def contour_lattices(step: int, anchors: list[tuple[int, int]], n_per_row: int = 3) -> np.ndarray:
    """CLAM's and ZEUS's patches: one lattice per tissue contour, anchored at the contour's bounding box."""
    out = []
    for ax, ay in anchors:
        gx, gy = np.meshgrid(ax + np.arange(n_per_row) * step, ay + np.arange(2) * step)
        out.append(np.stack([gx.ravel(), gy.ravel()], axis=1))
    return np.concatenate(out)


@pytest.mark.slow
def test_per_contour_lattices_rescore(tmp_path, tiny_encoder, prompts):
    """CLAM/ZEUS feature files (a lattice per contour, anchors off the slide origin) re-score with ZEUS's rule."""
    from zeus_qupath.reconstruct import zeus_mask, zeus_mask_fullres

    coords = contour_lattices(112, [(37, 1000), (530, 15), (1301, 777)], n_per_row=4)  # 24 patches
    n = len(coords)
    feats = np.random.default_rng(7).normal(size=(n, tiny_encoder.embed_dim)).astype(np.float32)
    path = write_clam(tmp_path / "contours.h5", feats, coords)
    ps = score_features(path, tiny_encoder, prompts, patch_size=448, width=2200, height=1700)
    np.testing.assert_array_equal(ps.coords, coords)  # kept as written: no snapping to a grid
    assert ps.stride == 112 and ps.meta["stride_from"] == "most common gap between neighbouring patches"
    expected = cosine_scores(unit_features(feats), class_prototypes(tiny_encoder, prompts))
    np.testing.assert_allclose(ps.scores, expected, atol=1e-6)
    # the mask of the re-scored file is ZEUS's per-pixel rule on those very patches
    assert np.array_equal(zeus_mask(ps).mask, zeus_mask_fullres(ps))
    ps.save(tmp_path / "contours.scores.npz")
    np.testing.assert_array_equal(PatchScores.load(tmp_path / "contours.scores.npz").coords, coords)
    # a given --stride is recorded as given; one patch alone has no neighbour: its stride is the patch size
    size = {"patch_size": 448, "width": 2200, "height": 1700}
    assert score_features(path, tiny_encoder, prompts, stride=100, **size).stride == 100
    one = write_clam(tmp_path / "one.h5", feats[:1], coords[:1])
    assert score_features(one, tiny_encoder, prompts, **size).stride == 448


def test_dimension_mismatch_says_which_space(tmp_path, tiny_encoder, prompts):
    feats = np.random.default_rng(0).normal(size=(N, 32)).astype(np.float32)
    path = write_trident(tmp_path / "wrong_dim.h5", feats, grid_coords(112))
    with pytest.raises(ModelError) as exc:
        score_features(path, tiny_encoder, prompts)
    message = str(exc.value)
    assert "\n" not in message and "32-d" in message and f"{tiny_encoder.embed_dim}-d" in message
    assert "text-aligned" in message and "proj_contrast" in message


def test_encoder_attribute_warnings(tmp_path, tiny_encoder, prompts, raw_features):
    path = write_trident(tmp_path / "conch.h5", raw_features[1], grid_coords(112), encoder="conch_v1")
    ps = score_features(path, tiny_encoder, prompts)
    assert any("proj_contrast" in w for w in ps.meta["warnings"])
    path = write_trident(tmp_path / "uni.h5", raw_features[1], grid_coords(112), encoder="uni_v1")
    assert any("'uni_v1'" in w for w in score_features(path, tiny_encoder, prompts).meta["warnings"])


def test_empty_trident_file(tmp_path, tiny_encoder, prompts):
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.empty((0,), dtype=np.float32))
        d = f.create_dataset("coords", data=np.empty((0, 2), dtype=np.int64))
        for k, v in {"patch_size_level0": 448, "level0_width": 1000, "level0_height": 800}.items():
            d.attrs[k] = v
    ps = score_features(path, tiny_encoder, prompts)
    assert ps.scores.shape == (0, 2) and (ps.width, ps.height) == (1000, 800)


def test_screening_through_features(tmp_path, tiny_encoder, prompts, raw_features):
    path = write_trident(tmp_path / "s.h5", raw_features[1], grid_coords(112))
    ps = score_features(path, tiny_encoder, prompts, screening_k=4)
    assert len(ps.meta["per_model"][0]["screening"]["kept"]) == 4


@pytest.mark.parametrize(
    "case,message",
    [
        ("text", "not a readable HDF5"),
        ("no_coords", "no 'coords' dataset"),
        ("group", "no 'features' dataset"),
        ("rows", "'coords' has shape"),
        ("dims", "'features' has shape"),
        ("nan", "NaN"),
        ("zero", "all zeros"),
        ("negative", "non-negative"),
        ("missing", "not found"),
    ],
)
def test_malformed_files(tmp_path, tiny_encoder, prompts, raw_features, case, message):
    path = tmp_path / f"{case}.h5"
    feats, coords = raw_features[1].copy(), grid_coords(112)
    if case == "text":
        path.write_text("not hdf5")
    elif case == "no_coords":
        with h5py.File(path, "w") as f:
            f["features"] = feats
    elif case == "group":
        with h5py.File(path, "w") as f:
            f.create_group("features")
            f["coords"] = coords
    elif case == "rows":
        write_trident(path, feats, coords[:-1])
    elif case == "dims":
        with h5py.File(path, "w") as f:
            f["features"] = feats.reshape(N, 2, -1)
            f["coords"] = coords
    elif case == "nan":
        feats[2, 3] = np.nan
        write_trident(path, feats, coords)
    elif case == "zero":
        feats[4] = 0
        write_trident(path, feats, coords)
    elif case == "negative":
        write_trident(path, feats, coords - 112)
    with pytest.raises(ZeusError, match=message) as exc:
        score_features(path, tiny_encoder, prompts)
    assert "\n" not in str(exc.value)


def test_reader_and_unit_features(tmp_path, raw_features):
    unit, raw = raw_features
    ff = read_feature_file(write_clam(tmp_path / "r.h5", raw, grid_coords(256)))
    assert ff.coords.dtype == np.int64 and ff.features.dtype == np.float32 and ff.coords_attrs == {}
    np.testing.assert_allclose(unit_features(ff.features), unit, atol=1e-6)
