"""Tiny stand-ins for a CosyVoice part and datamodule (same contracts), so the task layer is tested alone."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn


class ToyPart(nn.Module):
    """``forward(batch, device) -> {'loss', 'acc'}`` like upstream's TransformerLM: predict speech tokens.

    ``inf_at_call`` injects an inf into the loss at that (0-based) training forward call, which makes
    the gradient non-finite. ``last_dtype`` records the compute dtype seen inside the step.
    """

    def __init__(self, vocab: int = 16, dim: int = 32, inf_at_call: int = -1, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab)
        self.inf_at_call = inf_at_call
        self.calls = 0
        self.last_dtype: torch.dtype | None = None

    def forward(self, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        x = batch["text_token"].to(device)
        y = batch["speech_token"].to(device)
        h = self.drop(torch.tanh(self.proj(self.embed(x))))
        logits = self.out(h)
        self.last_dtype = logits.dtype
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        if self.training:
            if self.calls == self.inf_at_call:
                loss = loss * float("inf")
            self.calls += 1
        acc = (logits.argmax(-1) == y).float().mean()
        return {"loss": loss, "acc": acc}


class ToyFlow(nn.Module):
    """Flow-shaped stand-in: regress ``speech_feat`` from tokens + embedding; upstream's inference signature."""

    def __init__(self, vocab: int = 16, n_mels: int = 80) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, n_mels)
        self.spk = nn.Linear(192, n_mels)

    def _mel(self, token: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.embed(token) + self.spk(embedding).unsqueeze(1)
        return h.repeat_interleave(2, dim=1)  # (B, 2*T, 80): two frames per token

    def forward(self, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        mel = self._mel(batch["speech_token"].to(device), batch["embedding"].to(device))
        return {"loss": nn.functional.l1_loss(mel, batch["speech_feat"].to(device))}

    def inference(self, token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len,
                  embedding, flow_cache):
        return self._mel(token, embedding).transpose(1, 2), flow_cache


def toy_batches(n: int, batch_size: int = 4, length: int = 6, vocab: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab, (batch_size, length), generator=g)
        out.append({"text_token": x, "text_token_len": torch.full((batch_size,), length),
                    "speech_token": (x * 3 + 1) % vocab, "speech_token_len": torch.full((batch_size,), length),
                    "speech_feat": torch.randn(batch_size, 2 * length, 80, generator=g),
                    "speech_feat_len": torch.full((batch_size,), 2 * length),
                    "embedding": torch.randn(batch_size, 192, generator=g),
                    "utts": [f"u{i}" for i in range(batch_size)]})
    return out


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


class ToyDataModule(pl.LightningDataModule):
    """Pre-batched dicts, fixed order: one epoch = ``num_batches`` steps."""

    def __init__(self, num_batches: int = 4, batch_size: int = 4, vocab: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.num_batches, self.batch_size, self.vocab, self.seed = num_batches, batch_size, vocab, seed

    def _loader(self, n: int, seed: int) -> torch.utils.data.DataLoader:
        data = _ListDataset(toy_batches(n, self.batch_size, vocab=self.vocab, seed=seed))
        return torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.num_batches, self.seed)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(2, self.seed + 1)

    @property
    def skipped(self) -> dict[str, int]:
        """Like CosyDataModule.skipped: utterances dropped by reason."""
        return {"too_long": 3, "bad_token": 1}


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """All TensorBoard scalars under ``log_dir`` (every event file, so resumed runs are included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    from pathlib import Path

    accs = []
    for f in Path(log_dir).glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        accs.append(acc)
    # in the order the runs wrote them: the names end in seconds.host.pid.N with N a per-process counter
    # compared as text, so two runs started within one second of a long session could sort swapped (".10" < ".9")
    accs.sort(key=lambda a: a.FirstEventTimestamp())
    for acc in accs:
        for tag in acc.Tags()["images"]:
            out.setdefault("image:" + tag, []).extend((e.step, float(e.width)) for e in acc.Images(tag))
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


class StepRecorder(pl.Callback):
    """Records, per optimizer step, the loss, a weight snapshot, lr, loss scale and skipped count."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        part = pl_module.llm
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.rows.append({
            "step": trainer.global_step,
            "loss": float(outputs["loss"]),
            "weight": part.out.weight.detach().clone(),
            "dtype": part.last_dtype,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "scale": float(scaler.get_scale()) if scaler is not None else None,
            "skipped": pl_module.skipped_steps,
        })
