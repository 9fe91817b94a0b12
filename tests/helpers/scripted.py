"""A run whose validation losses are scripted: the epoch loop's decisions (best epoch, early stopping,
a scheduler stepped on a metric) then follow numbers the test chose."""

from __future__ import annotations

from coupled_net.trainer import Trainer


def scripted_validation(monkeypatch, val_losses, ke_losses):
    """Validation before KE reports val_losses[epoch-1], after KE ke_losses[epoch-1]; returns the list of
    (epoch, after KE) calls, appended to as the run validates."""
    calls = []

    def evaluate(self, name, desc=""):
        if name == "val" and desc.startswith("epoch"):
            epoch = int(desc.split()[1])
            loss = ke_losses[epoch - 1] if desc.endswith("after KE") else val_losses[epoch - 1]
            calls.append((epoch, desc.endswith("after KE")))
            return {"loss": loss, "top1": 50.0, "top5": 90.0}
        return {"loss": 1.0, "top1": 50.0, "top5": 90.0}
    monkeypatch.setattr(Trainer, "evaluate_split", evaluate)
    return calls
