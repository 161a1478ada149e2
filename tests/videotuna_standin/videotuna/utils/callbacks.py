"""Stand-in for videotuna.utils.callbacks.ImageLogger: samples only when ``pl_module.logdir`` is set."""

import os

import pytorch_lightning as pl
import torch


class ImageLogger(pl.Callback):
    def __init__(self, batch_frequency, save_dir, max_images=8, clamp=True, rescale=True, to_local=False,
                 log_images_kwargs=None):
        super().__init__()
        self.batch_freq = batch_frequency
        self.max_images = max_images
        self.log_images_kwargs = log_images_kwargs or {}
        self.save_dir = os.path.join(save_dir, "images")
        os.makedirs(os.path.join(self.save_dir, "train"), exist_ok=True)

    def log_batch_imgs(self, pl_module, batch, batch_idx, split="train"):
        if (batch_idx + 1) % self.batch_freq == 0:
            is_train = pl_module.training
            if is_train:
                pl_module.eval()
            with torch.no_grad():
                logs = pl_module.log_images(batch, split=split, **self.log_images_kwargs)
            name = f"gs{pl_module.global_step}_ep{pl_module.current_epoch}_idx{batch_idx}_rank{pl_module.global_rank}"
            samples = logs["samples"][: self.max_images].detach().cpu().clamp(-1, 1)
            torch.save({"samples": samples, "condition": logs.get("condition")},
                       os.path.join(self.save_dir, split, name + ".pt"))
            if is_train:
                pl_module.train()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=None):
        # The host's condition: a batch frequency and a module logdir (GenerationBase.init_trainer sets it).
        if self.batch_freq != -1 and pl_module.logdir:
            self.log_batch_imgs(pl_module, batch, batch_idx, split="train")
