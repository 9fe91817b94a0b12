"""Optional experiment loggers (`logger=none|tensorboard`), fed one epochs.csv row per epoch."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError


class NullLogger:
    def __init__(self, run_dir: Path | None = None):
        pass

    def log_epoch(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Losses, accuracies before/after KE, lr and KE time as TensorBoard scalars."""

    SCALARS = {"train_loss": "loss/train", "val_loss": "loss/val", "ke_val_loss": "loss/val_after_ke",
               "train_acc": "accuracy/train", "val_acc": "accuracy/val", "ke_val_acc": "accuracy/val_after_ke",
               "lr": "lr", "ke_time_s": "time/ke_s", "epoch_time_s": "time/epoch_s"}

    def __init__(self, run_dir: Path, subdir: str = "tensorboard"):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("logger", "tensorboard",
                              "needs the tensorboard package: pip install -e '.[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / subdir))

    def log_epoch(self, row: dict) -> None:
        for column, tag in self.SCALARS.items():
            self.writer.add_scalar(tag, float(row[column]), int(row["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
