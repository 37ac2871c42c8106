"""Procedural video data: determinism, ranges, labels, the folder loader."""

import numpy as np
import pytest

from experiments import data as data_lib
from experiments.configs import DataConfig

CFG = DataConfig(frames=4, height=16, width=16, max_shapes=3, seed=0)


# Every batch below has 4 videos of CFG (one compilation of the renderer) except the other-seed one.


def test_same_seed_and_index_give_same_video():
    a = data_lib.ProceduralVideos(CFG).batch(3, 4)
    b = data_lib.ProceduralVideos(CFG).batch(3, 4)
    np.testing.assert_array_equal(np.asarray(a["video"]), np.asarray(b["video"]))
    np.testing.assert_array_equal(np.asarray(a["label"]), np.asarray(b["label"]))
    # Video i of a batch depends only on its index, not on the batch (or position) it is drawn in.
    shuffled = data_lib.ProceduralVideos(CFG).videos([13, 12, 15, 14])  # batch 3 holds videos 12..15
    np.testing.assert_array_equal(np.asarray(shuffled["video"]), np.asarray(a["video"])[[1, 0, 3, 2]])
    np.testing.assert_array_equal(np.asarray(shuffled["label"]), np.asarray(a["label"])[[1, 0, 3, 2]])


def test_streams_steps_and_seeds_differ():
    train = data_lib.ProceduralVideos(CFG).batch(0, 4)["video"]
    assert not np.allclose(train, data_lib.ProceduralVideos(CFG).batch(1, 4)["video"])
    assert not np.allclose(train, data_lib.ProceduralVideos(CFG, data_lib.VAL_STREAM).batch(0, 4)["video"])
    other_seed = DataConfig(frames=4, height=16, width=16, max_shapes=3, seed=1)
    assert not np.allclose(train, data_lib.ProceduralVideos(other_seed).batch(0, 4)["video"])


def test_shapes_ranges_labels_and_motion():
    batches = [data_lib.ProceduralVideos(CFG).batch(step, 4) for step in range(8)]
    v, y = (np.concatenate([np.asarray(b[name]) for b in batches]) for name in ("video", "label"))
    assert v.shape == (32, 4, 16, 16, 3) and v.dtype == np.float32
    assert v.min() >= -1.0 and v.max() <= 1.0
    assert y.shape == (32,) and y.min() >= 0 and y.max() < data_lib.NUM_CLASSES
    assert len(set(y.tolist())) >= 3  # several classes appear
    assert np.abs(np.diff(v, axis=1)).mean() > 1e-3  # frames change: things move


def test_batches_iterator_resumes():
    it = data_lib.batches(data_lib.ProceduralVideos(CFG), 4, start_step=5)
    first = next(it)
    np.testing.assert_array_equal(
        np.asarray(first["video"]), np.asarray(data_lib.ProceduralVideos(CFG).batch(5, 4)["video"])
    )


def test_npy_folder_source(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(tmp_path / f"clip{i}.npy", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    (tmp_path / "labels.txt").write_text("0\n1\n2\n")
    src = data_lib.NpyFolderVideos(str(tmp_path), CFG)
    b = src.batch(1, 2)  # files 2, 0
    assert b["video"].shape == (2, 4, 16, 16, 3)
    assert np.asarray(b["label"]).tolist() == [2, 0]
    assert float(np.abs(b["video"]).max()) <= 1.0
    np.save(tmp_path / "clip9.npy", np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        data_lib.NpyFolderVideos(str(tmp_path), CFG).batch(1, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .npy"):
        data_lib.NpyFolderVideos(str(tmp_path / "empty"), CFG)
