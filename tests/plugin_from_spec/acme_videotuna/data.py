import lightning
import torch
from torch.utils.data import DataLoader, Dataset


class TogglePairs(Dataset):
    """Pair i: a bright winner and a dark loser, [C, F, H, W] in [-1, 1]."""

    def __init__(self, pairs, frames, size):
        self.pairs, self.frames, self.size = pairs, frames, size

    def __len__(self):
        return self.pairs

    def __getitem__(self, i):
        shape = (3, self.frames, self.size, self.size)
        return {"winner": torch.full(shape, 0.5), "loser": torch.full(shape, -0.5),
                "caption": f"pair {i}", "weight": torch.tensor(1.0)}


class ToggleData(lightning.LightningDataModule):
    def __init__(self, pairs, frames, size, batch_size):
        super().__init__()
        self.pairs, self.frames, self.size, self.batch_size = pairs, frames, size, batch_size
        self.dataset = None

    @classmethod
    def from_config(cls, data_cfg):
        return cls(int(data_cfg.pairs), int(data_cfg.get("frames", 2)), int(data_cfg.get("size", 8)),
                   int(data_cfg.get("batch_size", 2)))

    def setup(self, stage=None):
        self.dataset = TogglePairs(self.pairs, self.frames, self.size)

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)
