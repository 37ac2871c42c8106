"""Natural-image video source: determinism by seed and index, shapes, ranges, labels, motion, the loader switch."""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("skimage")

from experiments import data as data_lib  # noqa: E402
from experiments import natural_video  # noqa: E402
from experiments.configs import DataConfig  # noqa: E402

CFG = DataConfig(frames=4, height=16, width=24, max_shapes=3, seed=0, source="natural")


def test_image_bank_is_rgb_in_range():
    bank = natural_video.image_bank()
    assert bank.shape == (len(natural_video.IMAGES), natural_video.BANK_SIZE, natural_video.BANK_SIZE, 3)
    assert bank.dtype == np.float32 and bank.min() >= -1.0 and bank.max() <= 1.0
    assert bank.std(axis=(1, 2, 3)).min() > 0.05  # every photograph has content


def test_deterministic_by_seed_and_index():
    src = data_lib.make_source(CFG)
    assert isinstance(src, natural_video.NaturalVideos)
    a, b = src.batch(2, 4), data_lib.make_source(CFG).batch(2, 4)
    np.testing.assert_array_equal(np.asarray(a["video"]), np.asarray(b["video"]))
    np.testing.assert_array_equal(np.asarray(a["label"]), np.asarray(b["label"]))
    shuffled = src.videos([9, 8, 11, 10])  # batch 2 holds videos 8..11
    np.testing.assert_array_equal(np.asarray(shuffled["video"]), np.asarray(a["video"])[[1, 0, 3, 2]])
    assert not np.allclose(a["video"], src.batch(3, 4)["video"])
    assert not np.allclose(a["video"], data_lib.make_source(CFG, data_lib.VAL_STREAM).batch(2, 4)["video"])
    other = data_lib.make_source(dataclasses.replace(CFG, seed=1)).batch(2, 4)
    assert not np.allclose(a["video"], other["video"])


def test_shapes_ranges_labels_and_motion():
    src = data_lib.make_source(CFG)
    batches = [src.batch(step, 4) for step in range(6)]
    v, y = (np.concatenate([np.asarray(b[name]) for b in batches]) for name in ("video", "label"))
    assert v.shape == (24, 4, 16, 24, 3) and v.dtype == np.float32
    assert v.min() >= -1.0 and v.max() <= 1.0
    assert y.dtype == np.int32 and y.min() >= 0 and y.max() < data_lib.num_classes(CFG) == 8
    assert len(set(y.tolist())) >= 4
    assert np.abs(np.diff(v, axis=1)).mean() > 1e-2  # the camera and the sprites move
    # Natural images: far more spatial detail than flat backgrounds (mean |horizontal gradient|).
    shapes = data_lib.make_source(dataclasses.replace(CFG, source="shapes")).batch(0, 4)["video"]
    assert np.abs(np.diff(v, axis=3)).mean() > 2 * np.abs(np.diff(np.asarray(shapes), axis=3)).mean()


def test_bad_source_and_channels():
    with pytest.raises(ValueError, match="source"):
        DataConfig(source="webvid")
    with pytest.raises(ValueError, match="RGB"):
        data_lib.make_source(dataclasses.replace(CFG, channels=1)).batch(0, 2)
