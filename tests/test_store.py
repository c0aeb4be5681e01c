"""HDF5 dataset cache: keys, round trip, and that half-written files are never valid."""

import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from partonic.cards import load_card
from partonic.io.store import DatasetCache, cache_key


def test_round_trip_and_keys(tmp_path):
    cache = DatasetCache(tmp_path)
    card = load_card("cards/zw.yaml")
    key = cache_key("zw", card.data, card.seed)
    assert key == cache_key("zw", load_card("cards/zw.yaml").data, 1)
    assert key != cache_key("zw", card.data, 2)
    assert key != cache_key("zw", load_card("cards/zw.yaml", ["data.n_events=1000"]).data, 1)
    assert cache.load(key) is None
    arrays = {"parton": np.random.default_rng(0).normal(size=(5000, 4, 4)), "njet": np.arange(5000)}
    cache.save(key, arrays, meta={"n_failed_selection": 17})
    back, meta = cache.load(key)
    np.testing.assert_array_equal(back["parton"], arrays["parton"])
    np.testing.assert_array_equal(back["njet"], arrays["njet"])
    assert meta == {"n_failed_selection": 17}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_unfinished_and_corrupt_files_are_not_valid(tmp_path):
    cache = DatasetCache(tmp_path)
    key = cache_key("x", {"a": 1}, 0)
    # a file without the completion mark (as if the writer died before the end)
    with h5py.File(cache.path(key), "w") as fh:
        fh.attrs["partonic_format"] = 1
        fh.attrs["key"] = key
        fh.create_dataset("x", data=np.zeros(10))
    with pytest.warns(RuntimeWarning, match="ignoring unusable"):
        assert cache.load(key) is None
    assert not cache.path(key).exists()
    # garbage bytes
    cache.path(key).write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(300))
    with pytest.warns(RuntimeWarning):
        assert cache.load(key) is None


def test_writer_killed_mid_write_leaves_no_valid_file(tmp_path):
    """SIGKILL a writer while it writes a large dataset: the key stays absent."""
    script = textwrap.dedent(
        f"""
        import os, signal, numpy as np, h5py
        from partonic.io import store
        real = h5py.File.create_dataset
        def dying(self, *a, **k):
            out = real(self, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
            return out
        h5py.Group.create_dataset = dying
        store.DatasetCache({str(tmp_path)!r}).save("k", {{"x": np.ones((200000, 8))}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    cache = DatasetCache(tmp_path)
    assert not cache.path("k").exists()
    assert cache.load("k") is None
