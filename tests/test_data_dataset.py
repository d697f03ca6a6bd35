"""Reading: memory-mapped TrajectoryDataset and the Lightning data module."""

import pickle

import lightning as L
import pytest
import torch

from dsno.data import (
    CorruptShardError,
    DatasetError,
    DatasetNotFoundError,
    FingerprintMismatchError,
    TrajectoryDataModule,
    TrajectoryDataset,
    generate_dataset,
    make_fingerprint,
    trajectory_noise,
)

TIMES = [0.75, 0.5, 0.0]
SHAPE = (1, 3, 3)
NUM, SEED = 10, 3


def solve(x_T):
    t = torch.tensor(TIMES, dtype=x_T.dtype).view(1, -1, *([1] * (x_T.ndim - 1)))
    return x_T[:, None] * (1 + t) + t


FINGERPRINT = make_fingerprint(teacher={"class": "Toy"}, solver={"name": "toy", "order": 1, "options": {}},
                               grid=[1.0, 0.75, 0.5, 0.25, 0.0], times=TIMES, state_shape=SHAPE)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trajectories")
    generate_dataset(folder, solve=solve, fingerprint=FINGERPRINT, num_trajectories=NUM, shard_size=4,
                     state_shape=SHAPE, seed=SEED, batch_size=3, progress=False)
    return folder


def copy_dataset(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_items_are_the_generated_trajectories(data_dir):
    ds = TrajectoryDataset(data_dir, verify="full", expected_fingerprint=FINGERPRINT)
    noise = trajectory_noise(SEED, 0, NUM, SHAPE)
    assert len(ds) == NUM and ds.times == TIMES and ds.state_shape == SHAPE
    for i in range(NUM):
        x_T, states = ds[i]
        assert x_T.dtype == states.dtype == torch.float32
        assert x_T.shape == SHAPE and states.shape == (3, *SHAPE)
        assert torch.equal(x_T, noise[i]) and torch.equal(states, solve(noise[i:i + 1])[0])
    assert torch.equal(ds[-1][0], noise[-1])
    with pytest.raises(IndexError, match="trajectory index 10 out of range"):
        ds[NUM]
    x_T, _ = ds[0]
    x_T += 1  # items are private copies, the file stays read-only
    assert torch.equal(ds[0][0], noise[0])


def test_few_open_shards_and_pickling(data_dir):
    ds = TrajectoryDataset(data_dir, max_open_shards=1)
    noise = trajectory_noise(SEED, 0, NUM, SHAPE)
    for i in (9, 0, 5, 1, 8):  # jumps between the 3 shards with one mapped at a time
        assert torch.equal(ds[i][0], noise[i])
        assert len(ds._maps) == 1
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives
    assert len(pickle.dumps(ds)) < 4000 and len(clone._maps) == 0
    assert torch.equal(clone[7][1], solve(noise[7:8])[0])


def test_full_verification_names_the_bad_shard(data_dir, tmp_path):
    bad = copy_dataset(data_dir, tmp_path / "bad")
    victim = bad / "shard-00001.states.npy"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x80
    victim.write_bytes(bytes(data))
    TrajectoryDataset(bad, verify="quick")  # sizes and headers are intact
    with pytest.raises(CorruptShardError, match=r"shard-00001.states.npy \(shard 1\): sha256") as err:
        TrajectoryDataset(bad, verify="full")
    assert "data.repair=true" in str(err.value)
    victim.write_bytes(bytes(data[:-4]))
    with pytest.raises(CorruptShardError, match="shard-00001.states.npy"):
        TrajectoryDataset(bad, verify="quick")


def test_refusals(data_dir, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="python -m data_gen"):
        TrajectoryDataset(tmp_path / "missing")
    with pytest.raises(FingerprintMismatchError, match=r"times\[2\]: dataset 0.0 vs expected 0.1"):
        TrajectoryDataset(data_dir, expected_fingerprint={"times": [0.75, 0.5, 0.1]})
    with pytest.raises(ValueError, match="verify must be one of"):
        TrajectoryDataset(data_dir, verify="yes")
    unfinished = tmp_path / "unfinished"

    def fail_on_second_shard(x):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return solve(x)

    calls = []
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(unfinished, solve=fail_on_second_shard, fingerprint=FINGERPRINT, num_trajectories=NUM,
                         shard_size=4, state_shape=SHAPE, seed=SEED, batch_size=2, progress=False)
    with pytest.raises(DatasetError, match=r"unfinished \(1/3 shards\)"):
        TrajectoryDataset(unfinished)


def test_datamodule_split_is_deterministic_and_complete(data_dir):
    dm = TrajectoryDataModule(data_dir, batch_size=4, val_fraction=0.3, seed=1)
    assert dm.times == TIMES and dm.state_shape == SHAPE  # known before setup
    train, val = dm.split_indices()
    assert len(val) == 3 and sorted([*train, *val]) == list(range(NUM))
    again = TrajectoryDataModule(data_dir, batch_size=4, val_fraction=0.3, seed=1).split_indices()
    assert [a.tolist() for a in again] == [train.tolist(), val.tolist()]
    other = TrajectoryDataModule(data_dir, batch_size=4, val_fraction=0.3, seed=2).split_indices()
    assert other[1].tolist() != val.tolist()
    dm.setup("fit")
    seen = torch.cat([x for x, _ in dm.train_dataloader()])
    noise = trajectory_noise(SEED, 0, NUM, SHAPE)
    assert sorted(seen.flatten(1)[:, 0].tolist()) == sorted(noise[train].flatten(1)[:, 0].tolist())
    val_batches = list(dm.val_dataloader())
    assert torch.equal(torch.cat([x for x, _ in val_batches]), noise[val])
    no_val = TrajectoryDataModule(data_dir, batch_size=4, val_fraction=0.0)
    assert len(no_val.split_indices()[1]) == 0
    with pytest.raises(FingerprintMismatchError):
        TrajectoryDataModule(data_dir, batch_size=4, expected_fingerprint={"state_shape": [1, 4, 4]})
    with pytest.raises(ValueError, match="val_fraction must be in"):
        TrajectoryDataModule(data_dir, batch_size=4, val_fraction=1.0)


def test_workers_read_the_same_items(data_dir):
    dm = TrajectoryDataModule(data_dir, batch_size=2, num_workers=2, val_fraction=0.2, seed=0)
    dm.setup()
    _, val = dm.split_indices()
    got = torch.cat([states for _, states in dm.val_dataloader()])
    assert torch.equal(got, solve(trajectory_noise(SEED, 0, NUM, SHAPE))[val])


class _Regressor(L.LightningModule):
    """Predicts the stored states from x_T with one scale per time: enough to run a Trainer."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(len(TIMES)))

    def training_step(self, batch, _):
        x_T, states = batch
        pred = x_T[:, None] * self.scale.view(1, -1, 1, 1, 1)
        return torch.nn.functional.mse_loss(pred, states)

    def validation_step(self, batch, _):
        self.log("val_loss", self.training_step(batch, _))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_fits_from_the_datamodule(data_dir):
    dm = TrajectoryDataModule(data_dir, batch_size=4, val_fraction=0.2, seed=0)
    model = _Regressor()
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    assert not torch.equal(model.scale.detach(), torch.ones(3))
