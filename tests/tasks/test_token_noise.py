"""Token noise (``llm_input_noise``): which tokens change, that targets do not, and that only training sees it."""

from __future__ import annotations

import pytest
import torch

from cosytrain.errors import ConfigurationError
from cosytrain.tasks.lightning_cli import build_trainer
from cosytrain.tasks.speech_task import FlowTask, LLMTask, SpeechTask
from cosytrain.tasks.token_noise import noisy_speech_tokens
from tests.tasks._tiny_llms import LLMBatches, build_llm, llm_batches
from tests.tasks._toy import ToyPart

QUIET = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
             num_sanity_val_steps=0, logger=False, enable_checkpointing=False)


def test_noise_replaces_about_rate_of_the_real_tokens_with_batch_tokens_and_leaves_padding():
    tokens = torch.full((4, 500), -7)
    lengths = torch.tensor([500, 400, 100, 0])
    for row, n in enumerate(lengths.tolist()):
        tokens[row, :n] = torch.arange(n) % 50 + 100 * row  # each row its own ids: 0-49, 100-149, 200-249
    g = torch.Generator().manual_seed(0)
    noisy = noisy_speech_tokens(tokens, lengths, 0.3, generator=g)
    real = torch.arange(500)[None] < lengths[:, None]
    changed = (noisy != tokens) & real
    assert torch.equal(noisy[~real], tokens[~real])  # padding untouched
    fraction = changed.sum().item() / real.sum().item()
    assert 0.25 < fraction < 0.33  # 0.3 drawn, minus draws that happen to pick the same id
    pool = set(tokens[real].tolist())
    assert set(noisy[changed].tolist()) <= pool and -7 not in set(noisy[real].tolist())
    # drawn from the whole batch, not only the row: some of row 0's replacements come from other rows
    assert (noisy[0][changed[0]] >= 100).any()
    assert torch.equal(noisy_speech_tokens(tokens, lengths, 0.0), tokens)


def test_noise_from_the_vocabulary_draws_every_id_uniformly():
    tokens = torch.zeros(2, 4000, dtype=torch.long)
    lengths = torch.tensor([4000, 1000])
    noisy = noisy_speech_tokens(tokens, lengths, 0.5, vocab_size=8, generator=torch.Generator().manual_seed(1))
    assert noisy.dtype == tokens.dtype and noisy[1, 1000:].eq(0).all()
    drawn = noisy[torch.arange(4000)[None] < lengths[:, None]]
    counts = torch.bincount(drawn, minlength=8)
    # half kept (0) plus 1/8 of the other half drawn as 0; every other id about 1/16 of the tokens
    assert counts.numel() == 8 and abs(counts[0].item() / drawn.numel() - 0.5625) < 0.03
    assert all(abs(c / drawn.numel() - 0.0625) < 0.015 for c in counts[1:].tolist())


@pytest.mark.parametrize("gen", ["v1", "v2"])
def test_llm_reads_the_noisy_tokens_but_predicts_the_true_ones(gen):
    llm = build_llm(gen).eval()
    batch = llm_batches(1, gen)[0]
    logits, target = llm.logits_and_target(batch, torch.device("cpu"))
    same_logits, same_target = llm.logits_and_target(batch, torch.device("cpu"),
                                                      input_speech_token=batch["speech_token"].clone())
    assert torch.equal(logits, same_logits) and torch.equal(target, same_target)
    other = (batch["speech_token"] + 1) % int(batch["speech_token"].max() + 1)
    noisy_logits, noisy_target = llm.logits_and_target(batch, torch.device("cpu"), input_speech_token=other)
    assert torch.equal(noisy_target, target)  # the targets are the recorded tokens
    assert not torch.allclose(noisy_logits, logits)  # what the LM read did change
    assert llm(batch, torch.device("cpu"), input_speech_token=other)["loss"] != llm(batch, torch.device("cpu"))["loss"]


class _Spy(torch.nn.Module):
    """Wraps an LLM and records what ``input_speech_token`` each call got (None or a tensor)."""

    def __init__(self, llm: torch.nn.Module) -> None:
        super().__init__()
        self.inner = llm
        self.calls: list[tuple[bool, torch.Tensor | None, torch.Tensor]] = []

    def forward(self, batch, device, input_speech_token=None):
        self.calls.append((self.training, input_speech_token, batch["speech_token"]))
        return self.inner(batch, device, input_speech_token=input_speech_token)


def test_task_adds_noise_to_training_steps_only(tmp_path):
    spy = _Spy(build_llm("v1"))
    task = LLMTask(llm=spy, train_conf={"optim": "adam", "optim_conf": {"lr": 1e-3}, "scheduler": "constantlr"},
                   llm_input_noise=0.5)
    build_trainer(max_steps=2, default_root_dir=str(tmp_path), val_check_interval=2, **QUIET).fit(
        task, LLMBatches("v1", num_batches=2))
    train = [c for c in spy.calls if c[0]]
    val = [c for c in spy.calls if not c[0]]
    assert len(train) == 2 and len(val) == 2
    for _, noisy, clean in train:
        assert noisy is not None and noisy.shape == clean.shape and not torch.equal(noisy, clean)
    assert all(noisy is None for _, noisy, _ in val)


def test_bad_noise_settings_are_one_line_errors():
    with pytest.raises(ConfigurationError, match=r"llm_input_noise must be in \[0, 1\).*1.5"):
        LLMTask(llm=build_llm("v1"), llm_input_noise=1.5)
    with pytest.raises(ConfigurationError, match="llm_input_noise must be a number"):
        SpeechTask(llm=build_llm("v1"), llm_input_noise="lots")
    with pytest.raises(ConfigurationError, match="trains no llm"):
        SpeechTask(flow=ToyPart(), llm_input_noise=0.2)
    assert FlowTask(flow=ToyPart()).llm_input_noise == 0.0
