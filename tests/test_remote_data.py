"""Remote shards (http(s) URLs and pipe: commands, read through webdataset's gopen) against the same
shards read locally: same batches, same resume, and a clear error when the index is not reachable."""

from __future__ import annotations

import functools
import http.server
import os
import threading

import pytest

from test_data import assert_batches_equal, loader, make_cfgs, speech_set, take, write_set
from scaling.data.shards import expand_shards, index_path_of_shard, is_remote, shard_name


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """(directory, base URL) of an HTTP server on a free loopback port, serving that directory."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _local_set(root, n=17, per_shard=4):
    """A speech shard set in ``root/speech``: (local spec, shard directory)."""
    spec = write_set(root, "speech", speech_set(n), per_shard=per_shard)
    return spec, os.path.dirname(spec)


def test_remote_names_and_index_paths():
    for spec, name, index in [
        ("http://h:80/d/train-000003.tar", "train-000003.tar", "http://h:80/d/train.index.json"),
        ("pipe:cat /x/train-000002.tar", "train-000002.tar", "pipe:cat /x/train.index.json"),
        ("pipe:curl -s http://h/d/a-000001.tar | cat", "a-000001.tar", "pipe:curl -s http://h/d/a.index.json | cat"),
    ]:
        assert is_remote(spec) and shard_name(spec) == name and index_path_of_shard(spec) == index
    assert not is_remote("/d/train-000000.tar") and shard_name("/d/train-000000.tar") == "train-000000.tar"
    # brace patterns of URLs expand without touching the network
    assert expand_shards("http://h/d/train-{000000..000002}.tar")[2] == "http://h/d/train-000002.tar"


@pytest.mark.parametrize("bucketed", [False, True])
def test_http_shards_give_the_local_batches_and_resume_mid_epoch(tmp_path, http_root, bucketed, monkeypatch):
    from scaling.data.loader import _TarReader

    starts = []  # where remote streams were opened: a start > 0 is a skip into the shard
    opener = _TarReader._open_remote
    monkeypatch.setattr(_TarReader, "_open_remote", staticmethod(lambda path, lo: starts.append(lo) or opener(path, lo)))
    root, url = http_root
    spec, _ = _local_set(root)
    remote_spec = url + "/speech/" + os.path.basename(spec)
    kw = {"mb": 0, "max_batch_audio_samples": 30_000} if bucketed else {"mb": 3}
    # 2 ranks and windows of 4: runs start inside shards, so the remote reader skips into them
    cfgs = make_cfgs("speech", spec, shuffle_buffer=4)
    remote_cfgs = make_cfgs("speech", remote_spec, shuffle_buffer=4)
    local = loader(cfgs, rank=1, world_size=2, **kw)
    expected = take(local, 10)  # past the end of epoch 0 (8 or 9 samples per rank)
    assert local.epoch >= 1
    remote = loader(remote_cfgs, rank=1, world_size=2, **kw)
    assert_batches_equal(take(remote, 10), expected)
    remote.close()
    # a mid-epoch state of the local run resumes the remote one (and the other way round) exactly
    local = loader(cfgs, rank=1, world_size=2, **kw)
    take(local, 2)
    state = local.state_dict()
    assert state["epoch"] == 0
    fresh = loader(remote_cfgs, rank=1, world_size=2, **kw)
    fresh.load_state_dict(state)
    assert_batches_equal(take(fresh, 6), take(local, 6))
    back = loader(cfgs, rank=1, world_size=2, **kw)
    back.load_state_dict(fresh.state_dict())
    assert_batches_equal(take(back, 3), take(fresh, 3))
    for L in (local, fresh, back):
        L.close()
    assert any(lo > 0 for lo in starts) and 0 in starts


def test_pipe_shards_give_the_local_batches(tmp_path):
    spec, shard_dir = _local_set(tmp_path)
    pipe_spec = "pipe:cat " + os.path.join(shard_dir, os.path.basename(spec))
    cfgs = make_cfgs("speech", spec, shuffle_buffer=4)
    cfgs[0].num_workers = 2  # each DataLoader worker runs its own commands
    expected = take(loader(cfgs, mb=2, rank=0, world_size=2), 6)
    pipe_cfgs = make_cfgs("speech", pipe_spec, shuffle_buffer=4)
    pipe_cfgs[0].num_workers = 2
    L = loader(pipe_cfgs, mb=2, rank=0, world_size=2)
    assert_batches_equal(take(L, 6), expected)
    L.close()


def test_remote_shards_without_a_reachable_index_are_refused(tmp_path, http_root):
    root, url = http_root
    spec, shard_dir = _local_set(root)
    os.remove(os.path.join(shard_dir, "train.index.json"))
    remote_spec = url + "/speech/" + os.path.basename(spec)
    with pytest.raises(ValueError, match=r"remote shard http://127\.0\.0\.1:\d+/speech/train-000000\.tar: no readable "
                                         r"index at http://127\.0\.0\.1:\d+/speech/train\.index\.json"):
        loader(make_cfgs("speech", remote_spec), mb=2)
    with pytest.raises(ValueError, match="pipe:cat .*/nowhere/train.index.json"):
        loader(make_cfgs("speech", f"pipe:cat {tmp_path}/nowhere/train-000000.tar"), mb=2)
