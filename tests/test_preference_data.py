import json

import pytest
import torch
from omegaconf import OmegaConf

from tests.datasets import moving_square, write_official_dataset
from videotuna_dpo.data.datamodule import PreferenceDataModule, PreferenceVideoDataset
from videotuna_dpo.data.preference import DataError, load_pairs
from videotuna_dpo.data.video_io import write_video
from videotuna_dpo.errors import UserError

CAPTIONS = ["a red square moving right", "a blue square moving right", "a green square moving right"]


@pytest.fixture()
def dataset(tmp_path):
    return write_official_dataset(tmp_path / "ds", CAPTIONS)


def _edit_pairs(train_data, edit):
    path = train_data.parent / "part0" / "pair.json"
    pairs = json.loads(path.read_text())
    edit(pairs)
    path.write_text(json.dumps(pairs))
    return str(train_data.parent / "part0")


def test_reads_the_official_layout_with_local_indices(tmp_path):
    train_data = write_official_dataset(tmp_path / "ds", CAPTIONS, dirs=2)
    pairs = load_pairs(train_data)
    assert len(pairs) == 6
    second_dir = [p for p in pairs if p.meta_dir.endswith("part1")]
    # Row 1 of part1 names that dir's own videos 2 and 3.
    assert second_dir[1].winner.endswith("part1/videos/1_1_good.mp4")
    assert second_dir[1].loser.endswith("part1/videos/1_1_bad.mp4")
    assert second_dir[1].caption == CAPTIONS[1]
    assert all(p.weight == 1.0 for p in pairs)


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda p: p[1].update(video2=17), "pair.json row 1: video2=17 out of range (metadata.json has 6 entries)"),
        (lambda p: p[2].update(video2=4), "pair.json row 2: winner and loser are the same video (index 4)"),
        (lambda p: p[0].update(frame_caption="  "), "pair.json row 0: empty caption"),
        (lambda p: p[1].update(score=float("nan")), "pair.json row 1: score nan is not a finite number"),
        (lambda p: p[1].update(score=float("inf")), "pair.json row 1: score inf is not a finite number"),
        (lambda p: p[0].update(video1="0"), "pair.json row 0: video1 must be an integer index, got '0'"),
    ],
)
def test_each_validation_error_names_dir_row_and_problem(dataset, edit, problem):
    meta_dir = _edit_pairs(dataset, edit)
    with pytest.raises(DataError) as info:
        load_pairs(dataset)
    assert f"{meta_dir}/{problem}" in str(info.value)


def test_missing_video_file_is_named(dataset):
    missing = dataset.parent / "part0" / "videos" / "0_1_good.mp4"
    missing.unlink()
    with pytest.raises(DataError) as info:
        load_pairs(dataset)
    assert f"part0/pair.json row 1: video file(s) not found: {missing}" in str(info.value)


def test_all_problems_are_reported_together(dataset):
    _edit_pairs(dataset, lambda p: (p[0].update(video1=99), p[2].update(frame_caption="")))
    with pytest.raises(DataError) as info:
        load_pairs(dataset)
    assert "2 problem(s)" in str(info.value)
    assert "row 0: video1=99" in str(info.value) and "row 2: empty caption" in str(info.value)


def test_dir_listed_twice_and_malformed_json_are_errors(dataset):
    (dataset.parent / "train_data.yaml").write_text("META: [part0, ./part0]\n")
    with pytest.raises(DataError, match=r"META\[1\] ./part0 is listed twice \(also META\[0\]\)"):
        load_pairs(dataset)
    (dataset.parent / "train_data.yaml").write_text("META: [part0]\n")
    (dataset.parent / "part0" / "pair.json").write_text("[{\"video1\": 0,")
    with pytest.raises(DataError, match=r"part0/pair.json: malformed JSON"):
        load_pairs(dataset)


def test_official_pair_score_weights(dataset):
    _edit_pairs(dataset, lambda p: [q.update(score=s) for q, s in zip(p, [0.72, 0.36, 0.18])])
    weights = [p.weight for p in load_pairs(dataset, weights="pair_score", alpha=0.5)]
    assert weights == pytest.approx([1.0, 2 ** 0.5, 2.0])
    manifest = {"pairs": [{"weight": 0.5}, {"weight": 1.5}, {"weight": 2.5}]}
    (dataset.parent / "part0" / "manifest.json").write_text(json.dumps(manifest))
    assert [p.weight for p in load_pairs(dataset)] == [0.5, 1.5, 2.5]
    assert [p.weight for p in load_pairs(dataset, weights="none")] == [1.0, 1.0, 1.0]


def test_winner_and_loser_use_the_same_frame_positions(tmp_path):
    root = tmp_path / "ds"
    train_data = write_official_dataset(root, CAPTIONS[:1], frames=20)
    # Frame f of both videos encodes f in its brightness, so sampled positions are readable.
    for name in ("0_0_good", "0_0_bad"):
        video = torch.stack([torch.full((3, 32, 32), 10 * f, dtype=torch.uint8) for f in range(20)])
        write_video(root / "part0" / "videos" / f"{name}.mp4", video, lossless=True)
    ds = PreferenceVideoDataset(load_pairs(train_data), video_length=4, frame_stride=3, resolution=(16, 16))
    for _ in range(5):
        item = ds[0]
        assert item["winner"].shape == (3, 4, 16, 16)
        levels_w = ((item["winner"][0, :, 0, 0] + 1) * 127.5).round().tolist()
        levels_l = ((item["loser"][0, :, 0, 0] + 1) * 127.5).round().tolist()
        start = item["frame_start"]
        assert levels_w == levels_l == [10 * (start + 3 * i) for i in range(4)]


def test_undecodable_or_short_video_is_an_error_never_a_substitute(dataset):
    ds = PreferenceVideoDataset(load_pairs(dataset), video_length=9, frame_stride=1, resolution=(32, 32))
    bad = dataset.parent / "part0" / "videos" / "0_1_bad.mp4"
    bad.write_bytes(b"not a video at all")
    assert ds[0]["caption"] == CAPTIONS[0]
    with pytest.raises(UserError) as info:
        ds[1]
    assert f"part0/pair.json row 1: {bad}: cannot decode" in str(info.value)
    with pytest.raises(UserError, match=r"row 1: .*0_1_bad.mp4: cannot decode"):  # found before training
        PreferenceVideoDataset(load_pairs(dataset), video_length=9, frame_stride=1, resolution=(32, 32))


def test_clips_too_short_for_the_stride_train_at_the_largest_stride_that_fits(tmp_path, capsys):
    # VC2's own samples: 16 frames, trained as the shipped configs say (16 frames at stride 4 need 61).
    root = tmp_path / "ds"
    train_data = write_official_dataset(root, CAPTIONS[:1], frames=16)
    for name in ("0_0_good", "0_0_bad"):
        video = torch.stack([torch.full((3, 32, 32), 10 * f, dtype=torch.uint8) for f in range(16)])
        write_video(root / "part0" / "videos" / f"{name}.mp4", video, lossless=True)
    dm = PreferenceDataModule.from_config(OmegaConf.create(
        {"train_data": str(train_data), "video_length": 8, "frame_stride": 4, "resolution": [16, 16]}))
    dm.setup("fit")
    assert dm.dataset.strides == [2]  # 8 frames at stride 2 span 15 <= 16; stride 3 would need 22
    assert "1 of 1 pairs trained at stride 2 instead of 4" in capsys.readouterr().err
    item = dm.dataset[0]
    levels = ((item["winner"][0, :, 0, 0] + 1) * 127.5).round().tolist()
    assert levels == [10 * (item["frame_start"] + 2 * i) for i in range(8)] and item["frame_stride"] == 2
    with pytest.raises(UserError, match=r"part0/pair.json row 0: .*16 frames, but data.video_length=17 needs at least 17"):
        PreferenceVideoDataset(load_pairs(train_data), video_length=17, frame_stride=4, resolution=(16, 16))


def test_meta_dirs_resolve_against_the_yaml_then_the_working_directory(tmp_path, monkeypatch):
    from videotuna_dpo.data.preference import DataError, meta_dirs

    # The official configs/vc2_dpo/vidpro/train_data.yaml names dataset/... relative to the working directory.
    (tmp_path / "dataset" / "vidpro").mkdir(parents=True)
    (tmp_path / "configs").mkdir()
    official = tmp_path / "configs" / "train_data.yaml"
    official.write_text("META:\n  - dataset/vidpro\n")
    monkeypatch.chdir(tmp_path)
    assert meta_dirs(official) == [tmp_path / "dataset" / "vidpro"]
    (tmp_path / "configs" / "dataset" / "vidpro").mkdir(parents=True)  # the yaml's folder wins when both exist
    assert meta_dirs(official) == [tmp_path / "configs" / "dataset" / "vidpro"]
    official.write_text("META:\n  - nowhere/vidpro\n")
    with pytest.raises(DataError) as info:
        meta_dirs(official)
    assert (f"META dir nowhere/vidpro not found, neither relative to the yaml's folder "
            f"({tmp_path / 'configs' / 'nowhere' / 'vidpro'}) nor to the working directory "
            f"({tmp_path / 'nowhere' / 'vidpro'})") in str(info.value)


def test_datamodule_is_registered_and_validates_its_config(dataset):
    from videotuna_dpo.config import ConfigError
    from videotuna_dpo.registry import Registry

    cls = Registry.load().get("datamodule", "preference")
    assert cls is PreferenceDataModule
    with pytest.raises(ConfigError, match=r"unknown key 'data\.video_lenght'\. Did you mean 'data\.video_length'"):
        cls.from_config(OmegaConf.create({"train_data": str(dataset), "video_lenght": 9}))
    dm = cls.from_config(OmegaConf.create({"train_data": str(dataset), "video_length": 9, "resolution": [24, 24], "batch_size": 3}))
    batch = next(iter(dm.train_dataloader()))
    assert batch["winner"].shape == (3, 3, 9, 24, 24)
    assert batch["winner"].min() >= -1 and batch["winner"].max() <= 1
    assert sorted(batch["caption"]) == sorted(CAPTIONS)


def test_datamodule_normalizes_pair_weights_to_mean_one(dataset):
    (dataset.parent / "part0" / "manifest.json").write_text(json.dumps({"pairs": [{"weight": w} for w in (2.0, 4.0, 6.0)]}))
    base = {"train_data": str(dataset), "video_length": 9, "resolution": [32, 32], "shuffle": False}
    dm = PreferenceDataModule.from_config(OmegaConf.create(base))
    dm.setup()
    assert [p.weight for p in dm.pairs] == pytest.approx([0.5, 1.0, 1.5])  # divided by the mean, 4
    raw = PreferenceDataModule.from_config(OmegaConf.create({**base, "normalize_weights": False}))
    raw.setup()
    assert [p.weight for p in raw.pairs] == [2.0, 4.0, 6.0]
    assert raw.dataset[2]["weight"].item() == 6.0 and dm.dataset[2]["weight"].item() == pytest.approx(1.5)


def test_a_cache_with_random_clip_starts_is_refused_by_name(dataset):
    cfg = {"train_data": str(dataset), "cache": "data/cache"}
    with pytest.raises(UserError, match=r"data.cache holds each video's first clip only, but data.frame_start='random'"):
        PreferenceDataModule.from_config(OmegaConf.create({**cfg, "frame_start": "random"}))
    assert PreferenceDataModule.from_config(OmegaConf.create(cfg)).cfg.frame_start == "auto"
    for key in ("video_length", "frame_stride"):
        with pytest.raises(UserError, match=rf"bad value for 'data.{key}': 0 \(expected an integer >= 1\)"):
            PreferenceDataModule.from_config(OmegaConf.create({"train_data": str(dataset), key: 0}))


def test_epoch_order_is_seeded_by_epoch_shared_across_ranks_and_resumes_mid_epoch():
    from videotuna_dpo.data.order import EpochOrder

    whole = EpochOrder(5, seed=7)
    epoch0 = [i for i, _ in whole]
    assert sorted(epoch0) == [0, 1, 2, 3, 4] and [i for i, _ in EpochOrder(5, seed=7)] == epoch0  # no history
    whole.set_epoch(1)
    assert [k for k in whole][0][1] == 1 and [i for i, _ in whole] != epoch0
    ranks = [EpochOrder(5, seed=7, rank=r, world_size=2) for r in (0, 1)]
    shares = [[i for i, _ in r] for r in ranks]
    assert len(shares[0]) == len(shares[1]) == len(ranks[0]) == 3  # padded to equal shares, as DistributedSampler
    assert sorted(set(shares[0] + shares[1])) == [0, 1, 2, 3, 4]
    resumed = EpochOrder(5, seed=7)
    resumed.skip = 2
    assert [i for i, _ in resumed] == epoch0[2:] and [i for i, _ in resumed] == epoch0  # the skip applies once
    assert EpochOrder(5, seed=7, shuffle=False).indices() == [0, 1, 2, 3, 4]


def test_under_several_processes_each_rank_shards_itself_with_a_sampler_lightning_keeps(tmp_path):
    """Under a DDP strategy Lightning wraps any sampler but a DistributedSampler in its own (VideoTuna's Trainer keeps
    use_distributed_sampler on, and its DDP even on one device), which reshards the whole order and cannot resume a
    rank mid-epoch."""
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    dataset = write_official_dataset(tmp_path / "ds", [f"caption {i}" for i in range(5)])

    def share(rank, world, done=0):
        module = PreferenceDataModule.from_config(OmegaConf.create({"train_data": str(dataset), "batch_size": 1,
                                                                       "video_length": 4}))
        module.seed = 3 + rank  # each rank seeded otherwise; the strategy broadcasts rank 0's seed
        progress = SimpleNamespace(current=SimpleNamespace(ready=done))
        module.trainer = SimpleNamespace(global_rank=rank, world_size=world, strategy=SimpleNamespace(broadcast=lambda x: 3),
                                         fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))
        loader = module.train_dataloader()
        return loader, [int(i) for i, _ in loader.sampler]

    (loader0, first), (loader1, second) = share(0, 2), share(1, 2)
    assert isinstance(loader0.sampler, DistributedSampler) and isinstance(loader1.sampler, DistributedSampler)
    assert (loader0.sampler.rank, loader0.sampler.num_replicas, loader1.sampler.rank) == (0, 2, 1)
    assert len(first) == len(second) == len(loader0) == 3  # 5 pairs padded to 2 x 3, as DistributedSampler pads
    assert sorted(set(first) | set(second)) == [0, 1, 2, 3, 4]
    whole = share(0, 1)[1]
    assert first == whole[0::2] and second == (whole + whole[:1])[1::2]
    # A run resumed after 2 batches of the epoch: each rank continues its own share where it stopped.
    assert share(0, 2, done=2)[1] == first[2:] and share(1, 2, done=2)[1] == second[2:]


def _official_scripts_dataset(root, scores):
    """A dataset as the official VideoDPO scripts write it: winvideos/ and losevideos/ under the video root,
    metadata.json with absolute clip paths and the constant duration 1.6, pair.json rows {video1, video2,
    label, frame_caption} plus, after its pair_prob.py, score and diff_score; a train_data.yaml whose META dir
    is relative to the working directory, as in its configs."""
    meta = root / "data" / "vidpro-vc2-dpo-dataset"
    meta.mkdir(parents=True)
    metadata, pairs = [], []
    for i, (caption, score) in enumerate(zip(CAPTIONS, scores)):
        for folder, jitter in (("winvideos", False), ("losevideos", True)):
            path = root / "videos" / "total_score_0P_vbscore" / folder / f"{i + 1:06}.mp4"
            write_video(path, moving_square(9, 32, jitter=jitter, seed=i), lossless=True)
            metadata.append({"basic": {"clip_duration": 1.6, "clip_path": str(path), "globalidx": i + 1},
                             "misc": {"frame_caption": [caption]}})
        row = {"video1": 2 * i, "video2": 2 * i + 1, "label": 0, "frame_caption": caption}
        if score is not None:
            row.update(score=score, diff_score=0.25)
        pairs.append(row)
    (meta / "metadata.json").write_text(json.dumps(metadata))
    (meta / "pair.json").write_text(json.dumps(pairs))
    (root / "configs").mkdir()
    (root / "configs" / "train_data.yaml").write_text("META:\n  -  data/vidpro-vc2-dpo-dataset\n")
    return root / "configs" / "train_data.yaml"


@pytest.mark.parametrize("scores, alpha, expected", [
    ([0.04, 0.0025, 0.09], 1.0, [18.0, 288.0, 8.0]),  # (0.72 / score) ** alpha
    ([0.04, 0.0025, 0.09], 0.5, [18.0 ** 0.5, 288.0 ** 0.5, 8.0 ** 0.5]),
    ([0.04, 0.0025, 0.09], 0.0, [1.0, 1.0, 1.0]),
    ([None, None, None], 1.0, [0.72, 0.72, 0.72]),  # no score: the official loader takes score 1
    ([0.36, None, 0.18], 2.0, [4.0, 0.72 ** 2, 16.0]),
])
def test_a_dataset_of_the_official_scripts_trains_unchanged_with_the_official_dupfactor(
        tmp_path, monkeypatch, scores, alpha, expected):
    from tests.official_loader import official_pairs

    train_data = _official_scripts_dataset(tmp_path, scores)
    monkeypatch.chdir(tmp_path)
    official = official_pairs("configs/train_data.yaml", dupbeta=alpha)
    assert [o.dupfactor for o in official] == pytest.approx(expected, rel=1e-12)
    pairs = load_pairs("configs/train_data.yaml", weights="pair_score", alpha=alpha)
    assert [(p.winner, p.loser, p.caption) for p in pairs] == [(o.winner, o.loser, o.caption) for o in official]
    assert [p.weight for p in pairs] == pytest.approx(expected, rel=1e-12)
    dm = PreferenceDataModule.from_config(OmegaConf.create(
        {"train_data": str(train_data), "weights": "pair_score", "alpha": alpha, "normalize_weights": False,
         "video_length": 9, "resolution": [32, 32], "batch_size": 3, "shuffle": False}))
    batch = next(iter(dm.train_dataloader()))
    assert batch["caption"] == CAPTIONS and batch["winner"].shape == (3, 3, 9, 32, 32)
    assert batch["weight"].tolist() == pytest.approx(expected, rel=1e-6)
