"""Real CosyVoice LLMs at toy size (v1 TransformerLM, v2 Qwen2LM, v3 CosyVoice3LM), base model
directories holding only their ``llm.pt``, and batches of upstream's keys for them.

The v1 widths are the reliability recipe's (tests/reliability/tiny_llm_recipe.yaml); v2/v3 use the
repository's tiny Qwen2 config (conf/model/qwen2_tiny: 64 wide, 2 layers, 257 text ids).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from tests.tasks._toy import _ListDataset

REPO = Path(__file__).resolve().parents[2]
SPEECH_VOCAB = {"v1": 64, "v2": 256, "v3": 256}


def build_llm(gen: str, seed: int = 0) -> nn.Module:
    """A tiny LLM of generation ``gen`` with weights drawn from ``seed``."""
    from cosytrain.models.sampling import ras_sampling

    torch.manual_seed(seed)
    if gen == "v1":
        from cosytrain.models.llm import TransformerLM
        from cosytrain.models.transformer.encoder import ConformerEncoder, TransformerEncoder

        common = dict(output_size=32, attention_heads=2, linear_units=32, num_blocks=1, dropout_rate=0.1,
                      positional_dropout_rate=0.1, attention_dropout_rate=0.0, pos_enc_layer_type="rel_pos_espnet",
                      selfattention_layer_type="rel_selfattn", static_chunk_size=1)
        text_encoder = ConformerEncoder(input_size=16, normalize_before=True, input_layer="linear", use_cnn_module=False,
                                        macaron_style=False, use_dynamic_chunk=False, use_dynamic_left_chunk=False,
                                        **common)
        lm = TransformerEncoder(input_size=32, input_layer="linear_legacy", **common)
        return TransformerLM(16, 32, 32, 257, SPEECH_VOCAB["v1"], text_encoder, lm, ras_sampling,
                             length_normalized_loss=True, lsm_weight=0, spk_embed_dim=192)
    from cosytrain.models.llm import CosyVoice3LM, Qwen2Encoder, Qwen2LM

    cls = Qwen2LM if gen == "v2" else CosyVoice3LM
    return cls(64, 64, SPEECH_VOCAB[gen], Qwen2Encoder(str(REPO / "conf/model/qwen2_tiny")), ras_sampling)


def make_base_dir(path: Path, gen: str, seed: int = 7) -> Path:
    """A directory holding ``llm.pt`` of a tiny ``gen`` LLM (what ``init_from`` reads for the llm part)."""
    path.mkdir(parents=True, exist_ok=True)
    torch.save(build_llm(gen, seed).state_dict(), path / "llm.pt")
    return path


def base_llm(gen: str, base_dir: Path) -> nn.Module:
    """The base alone: a fresh tiny LLM with ``base_dir/llm.pt`` loaded strictly, in eval mode."""
    module = build_llm(gen, seed=123)
    module.load_state_dict(torch.load(base_dir / "llm.pt", weights_only=True), strict=True)
    return module.eval()


def llm_batches(n: int, gen: str, batch_size: int = 3, seed: int = 0, reject: bool = False, text_vocab: int = 257,
                speech_vocab: int | None = None) -> list[dict[str, Any]]:
    """Padded batches with varied lengths (and ``reject_speech_token`` for DPO when asked)."""
    g = torch.Generator().manual_seed(seed)
    vocab = speech_vocab or SPEECH_VOCAB[gen]
    out = []
    for _ in range(n):
        t_lens = torch.randint(3, 9, (batch_size,), generator=g)
        s_lens = torch.randint(4, 14, (batch_size,), generator=g)
        batch = {
            "text_token": torch.randint(1, text_vocab, (batch_size, int(t_lens.max())), generator=g),
            "text_token_len": t_lens.int(),
            "speech_token": torch.randint(0, vocab, (batch_size, int(s_lens.max())), generator=g),
            "speech_token_len": s_lens.int(),
            "embedding": torch.randn(batch_size, 192, generator=g),
        }
        if reject:
            r_lens = torch.randint(4, 14, (batch_size,), generator=g)
            batch["reject_speech_token"] = torch.randint(0, vocab, (batch_size, int(r_lens.max())), generator=g)
            batch["reject_speech_token_len"] = r_lens.int()
        out.append(batch)
    return out


class LLMBatches(pl.LightningDataModule):
    """Fixed pre-made batches: one epoch = ``num_batches`` steps; two validation batches."""

    def __init__(self, gen: str, num_batches: int = 4, reject: bool = False, **vocab: int) -> None:
        super().__init__()
        self.gen, self.num_batches, self.reject, self.vocab = gen, num_batches, reject, vocab

    def _loader(self, n: int, seed: int) -> torch.utils.data.DataLoader:
        data = _ListDataset(llm_batches(n, self.gen, seed=seed, reject=self.reject, **self.vocab))
        return torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.num_batches, 0)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(2, 1)
