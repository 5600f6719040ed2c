"""Latent shards: write/read round trip, lazy loading, manifest and shard errors naming files, the DDP sampler."""
import json
import os
import time

import pytest
import torch

from latteflow.core.files import sha256_file, weights_sha256
from latteflow.data.shards import (FORMAT, MANIFEST_NAME, LatentShards, ShardAwareSampler, load_manifest,
                                   write_manifest, write_shard)

SHAPE = (4, 2, 2)


def _write(folder, counts=(5, 3, 6), classes=("ant", "bee"), dtype=torch.float32):
    """Shards of random latents with labels; returns (manifest, all latents, all labels) in dataset order."""
    g = torch.Generator().manual_seed(1)
    entries, lats, labs = [], [], []
    for i, n in enumerate(counts):
        x = torch.randn(n, *SHAPE, generator=g)
        y = torch.randint(0, len(classes), (n,), generator=g)
        entries.append(write_shard(folder, i, x, y, dtype=dtype))
        lats.append(x.to(dtype).float())
        labs.append(y)
    labels = torch.cat(labs)
    manifest = {"format": FORMAT, "resolution": 16, "latent_shape": list(SHAPE), "scaling_factor": 0.5,
                "flip": False, "dtype": {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype],
                "classes": list(classes), "prompts": [f"a {c}" for c in classes],
                "counts": [int((labels == k).sum()) for k in range(len(classes))], "num_latents": int(sum(counts)),
                "shards": entries, "vae": {"folder": "/nowhere", "sha256": "0" * 64}, "skipped": []}
    write_manifest(folder, manifest)
    return manifest, torch.cat(lats), labels


def test_round_trip_reads_every_latent_and_its_label(tmp_path):
    manifest, lats, labels = _write(tmp_path)
    assert load_manifest(tmp_path) == manifest
    assert manifest["shards"][1] == {"file": "shard_00001.safetensors", "count": 3,
                                     "sha256": sha256_file(tmp_path / "shard_00001.safetensors")}
    ds = LatentShards(tmp_path, verify=True)
    assert len(ds) == 14 and ds.classes == ["ant", "bee"] and ds.prompts == ["a ant", "a bee"]
    assert ds.latent_shape == SHAPE and ds.resolution == 16 and ds.manifest == manifest
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == SHAPE and isinstance(y, int)
        assert torch.equal(x, lats[i]) and y == int(labels[i])
    assert torch.equal(ds[-1][0], lats[-1])
    with pytest.raises(IndexError):
        ds[14]
    with pytest.raises(TypeError, match="index"):
        ds["0"]
    assert ds.shard_ranges == [(0, 5), (5, 8), (8, 14)]
    fresh = LatentShards(tmp_path)
    assert torch.equal(fresh.labels(), labels) and fresh.labels().dtype == torch.int64
    assert not fresh._cache  # labels() loads no latents


def test_bfloat16_shards_come_out_as_float32(tmp_path):
    _, lats, _ = _write(tmp_path, dtype=torch.bfloat16)
    ds = LatentShards(tmp_path)
    assert ds[6][0].dtype == torch.float32 and torch.equal(ds[6][0], lats[6])


def test_reads_lazily_and_keeps_only_the_shards_that_fit(tmp_path):
    _, lats, _ = _write(tmp_path)
    ds = LatentShards(tmp_path)
    assert not ds._cache and ds.cached_shards == 3  # 14 small latents fit the default budget: all kept once read
    ds[6]
    assert list(ds._cache) == [1]
    one = 6 * (4 * 4 * 4 + 8)  # the biggest shard: 6 latents of 16 float32 + an int64 label each
    small = LatentShards(tmp_path, cache_bytes=one)
    assert small.cached_shards == 1
    for i in (0, 6, 9, 1):
        assert torch.equal(small[i][0], lats[i])
        assert len(small._cache) == 1
    assert list(small._cache) == [0]


def test_manifest_errors_name_the_file(tmp_path):
    path = str(tmp_path / MANIFEST_NAME)
    with pytest.raises(ValueError, match="manifest.json: missing"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not JSON"):
        LatentShards(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="manifest.json: must be a JSON object"):
        load_manifest(tmp_path)
    manifest, _, _ = _write(tmp_path)
    for key, value, message in (("classes", None, "lacks the keys \\['classes'\\]"),
                                ("num_latents", 13, "num_latents 13"),
                                ("format", "other/1", "format"),
                                ("latent_shape", [4, 2], "latent_shape")):
        bad = dict(manifest)
        if value is None:
            del bad[key]
        else:
            bad[key] = value
        (tmp_path / MANIFEST_NAME).write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message) as e:
            load_manifest(tmp_path)
        assert path in str(e.value)


def test_bad_shards_are_errors_naming_the_shard(tmp_path):
    manifest, _, _ = _write(tmp_path)
    shard1 = str(tmp_path / "shard_00001.safetensors")
    write_shard(tmp_path, 1, torch.zeros(4, *SHAPE), torch.zeros(4, dtype=torch.int64))  # 4 latents, manifest: 3
    with pytest.raises(ValueError, match="shard_00001.safetensors: holds 4 latents, manifest.json says 3"):
        LatentShards(tmp_path)
    write_shard(tmp_path, 1, torch.ones(3, *SHAPE), torch.zeros(3, dtype=torch.int64))  # right count, other bytes
    LatentShards(tmp_path)  # headers agree: fine without verify
    with pytest.raises(ValueError, match="shard_00001.safetensors: SHA-256"):
        LatentShards(tmp_path, verify=True)
    write_shard(tmp_path, 1, torch.ones(3, 4, 2, 3), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="shard_00001.safetensors: latents are F32 \\[3, 4, 2, 3\\]"):
        LatentShards(tmp_path)
    with open(shard1, "wb") as f:
        f.write(b"\x05\x00garbage")
    with pytest.raises(ValueError, match="shard_00001.safetensors: not a readable safetensors file"):
        LatentShards(tmp_path)
    os.unlink(shard1)
    with pytest.raises(ValueError, match="shard_00001.safetensors: missing"):
        LatentShards(tmp_path)


def test_a_shard_is_the_same_bytes_each_time_and_keeps_its_metadata(tmp_path):
    from latteflow.data.shards import shard_metadata

    meta = {k: str(v) for k, v in zip("abcdefgh", range(8))}
    x, y = torch.randn(3, *SHAPE), torch.arange(3)
    digests = {write_shard(tmp_path, 0, x, y, metadata=meta)["sha256"] for _ in range(10)}
    assert len(digests) == 1
    assert shard_metadata(str(tmp_path / "shard_00000.safetensors")) == meta
    write_shard(tmp_path, 1, x, y)
    assert shard_metadata(str(tmp_path / "shard_00001.safetensors")) == {}
    with pytest.raises(TypeError, match="metadata"):
        write_shard(tmp_path, 2, x, y, metadata={"a": 1})


def test_write_shard_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="latents"):
        write_shard(tmp_path, 0, torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        write_shard(tmp_path, 0, torch.zeros(2, *SHAPE), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="index"):
        write_shard(tmp_path, -1, torch.zeros(2, *SHAPE), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN"):
        write_shard(tmp_path, 0, torch.full((2, *SHAPE), float("nan")), torch.zeros(2, dtype=torch.int64))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("world,drop_last", [(1, False), (2, False), (3, False), (4, True)])
def test_sampler_rank_slices_are_disjoint_and_cover_the_data(world, drop_last):
    ranges = [(0, 5), (5, 8), (8, 14), (14, 21)]
    n = 21
    per_rank = [list(ShardAwareSampler(ranges, num_replicas=world, rank=r, seed=3, window=2, drop_last=drop_last))
                for r in range(world)]
    lengths = {len(p) for p in per_rank}
    assert lengths == {len(ShardAwareSampler(ranges, num_replicas=world, rank=0, drop_last=drop_last))}
    flat = [i for p in per_rank for i in p]
    if drop_last:
        assert len(flat) == (n // world) * world and len(set(flat)) == len(flat)
    else:
        assert set(flat) == set(range(n)) and len(flat) == -(-n // world) * world
        assert len(flat) - len(set(flat)) == len(flat) - n  # only the padding repeats
    # windows of 2 shards: the first 7+ indices of the epoch (all ranks together) come from 2 shards only
    order = list(ShardAwareSampler(ranges, seed=3, window=2))
    assert sorted(order) == list(range(n))
    first = order[:7]
    shards_hit = {next(k for k, (a, b) in enumerate(ranges) if a <= i < b) for i in first}
    assert len(shards_hit) <= 2


def test_sampler_is_seeded_and_epoch_aware():
    ranges = [(0, 10), (10, 20), (20, 30)]
    a, b = ShardAwareSampler(ranges, seed=0), ShardAwareSampler(ranges, seed=0)
    assert list(a) == list(b)
    e0 = list(a)
    a.set_epoch(1)
    assert list(a) != e0 and sorted(a) == list(range(30))
    assert list(ShardAwareSampler(ranges, seed=1)) != e0
    assert list(ShardAwareSampler(ranges, shuffle=False)) == list(range(30))
    with pytest.raises(ValueError, match="rank"):
        ShardAwareSampler(ranges, num_replicas=2, rank=2)
    with pytest.raises(TypeError, match="data"):
        ShardAwareSampler([(3, 1)])


def test_sampler_over_latent_shards_in_a_data_loader(tmp_path):
    _, lats, labels = _write(tmp_path)
    ds = LatentShards(tmp_path)
    sampler = ShardAwareSampler(ds, num_replicas=2, rank=1, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler)
    idx = list(sampler)
    got_x = torch.cat([x for x, _ in loader])
    got_y = torch.cat([y for _, y in loader])
    assert torch.equal(got_x, lats[idx]) and torch.equal(got_y, labels[idx])


def test_weights_sha256_of_one_file_and_of_several(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"abc")
    (tmp_path / "config.json").write_text("{}")
    one = weights_sha256(tmp_path)
    assert one["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256(b"abc")
    assert list(one["files"]) == ["a.safetensors"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"")
    two = weights_sha256(tmp_path)
    assert list(two["files"]) == ["a.safetensors", "sub/b.bin"] and two["sha256"] != one["sha256"]
    (tmp_path / "a.safetensors").write_bytes(b"abd")
    assert weights_sha256(tmp_path)["sha256"] != two["sha256"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: holds no weights file"):
        weights_sha256(tmp_path / "empty")


def _rank_job(rank, init_file, ranges, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        sampler = ShardAwareSampler(ranges, seed=7)  # world size and rank from the process group
        sampler.set_epoch(2)
        torch.save({"indices": list(sampler), "rank": sampler.rank, "world": sampler.num_replicas},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_sampler_takes_rank_and_world_from_a_gloo_group(tmp_path):
    import torch.multiprocessing as mp

    ranges = [(0, 6), (6, 9), (9, 17)]
    # fork: the children need nothing re-imported (spawn would take seconds per process)
    ctx = mp.start_processes(_rank_job, args=(str(tmp_path / "init"), ranges, str(tmp_path)), nprocs=2, join=False,
                             start_method="fork")
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-rank gloo job did not finish within 60 s")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [(g["rank"], g["world"]) for g in got] == [(0, 2), (1, 2)]
    for r, g in enumerate(got):  # the same as a sampler told its rank, at the same epoch
        local = ShardAwareSampler(ranges, num_replicas=2, rank=r, seed=7)
        local.set_epoch(2)
        assert g["indices"] == list(local)
    a, b = got[0]["indices"], got[1]["indices"]
    assert len(a) == len(b) == 9 and set(a) | set(b) == set(range(17)) and len(set(a) & set(b)) == 1  # 1 pad
