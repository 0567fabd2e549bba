"""DPO: upstream's DPOLoss numbers, sequence log-probabilities, the reference model (a frozen copy, or
the adapter-free base under LoRA), training that separates chosen from rejected, and exact resume."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from cosytrain.models.llm.dpo import dpo_loss, pair_batch, sequence_logps
from cosytrain.tasks.dpo_task import DPOTask
from cosytrain.tasks.lightning_cli import build_trainer
from tests.tasks._tiny_llms import LLMBatches, base_llm, build_llm, llm_batches, make_base_dir

CPU = torch.device("cpu")
FIXTURES = Path(__file__).resolve().parent / "fixtures"
QUIET = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
             num_sanity_val_steps=0)
TRAIN_CONF = {"optim": "adam", "optim_conf": {"lr": 0.01}, "scheduler": "constantlr"}


# ------------------------------------------------------------------------------------- the loss


# the inputs and settings handed to upstream's DPOLoss (tests/upstream/oracle/dpo_loss.py); its answer is
# kept in DPO_FIXTURE (made with upstream ace7c47, torch 2.9.1) and checked live by tests/upstream/test_dpo_loss.py
DPO_REQUEST = {
    "inputs": {"policy_chosen_logps": [-1.25, -2.5, -0.75, -3.0, -1.0, -2.25],
               "policy_rejected_logps": [-1.5, -2.0, -1.75, -2.5, -4.0, -2.25],
               "reference_chosen_logps": [-1.0, -2.75, -1.25, -2.5, -1.5, -2.0],
               "reference_rejected_logps": [-1.75, -2.25, -1.5, -3.5, -2.0, -2.5]},
    "cases": [{"beta": 0.01, "label_smoothing": 0.0, "ipo": False},  # upstream's bin/train.py settings
              {"beta": 0.5, "label_smoothing": 0.0, "ipo": False},
              {"beta": 0.5, "label_smoothing": 0.2, "ipo": False},
              {"beta": 0.1, "label_smoothing": 0.0, "ipo": True}],
}
DPO_FIXTURE = FIXTURES / "dpo_loss_upstream.json"


def _transcribed(pc, pr, rc, rr, beta, label_smoothing, ipo):
    """The formula as DPO papers write it, element by element (independent of the tensor code)."""
    losses, chosen, rejected = [], [], []
    for a, b, c, d in zip(pc, pr, rc, rr):
        z = (a - b) - (c - d)
        sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
        losses.append((z - 1 / (2 * beta)) ** 2 if ipo else
                      -math.log(sig(beta * z)) * (1 - label_smoothing) - math.log(sig(-beta * z)) * label_smoothing)
        chosen.append(beta * (a - c))
        rejected.append(beta * (b - d))
    return sum(losses) / len(losses), chosen, rejected


def test_dpo_loss_equals_upstream_dpoloss() -> None:
    """Against upstream's DPOLoss output (stored; live in tests/upstream) and the formula written out."""
    upstream = json.loads(DPO_FIXTURE.read_text())
    assert upstream["inputs"] == DPO_REQUEST["inputs"]
    inputs = {k: torch.tensor(v, dtype=torch.float32) for k, v in upstream["inputs"].items()}
    for case, asked in zip(upstream["cases"], DPO_REQUEST["cases"]):
        settings = {k: case[k] for k in ("beta", "label_smoothing", "ipo")}
        assert settings == asked
        loss, chosen, rejected = dpo_loss(*inputs.values(), **settings)
        assert loss.item() == pytest.approx(case["loss"], rel=1e-6, abs=1e-7), settings
        assert chosen.tolist() == pytest.approx(case["chosen_rewards"], rel=1e-6, abs=1e-7)
        assert rejected.tolist() == pytest.approx(case["rejected_rewards"], rel=1e-6, abs=1e-7)
        t_loss, t_chosen, t_rejected = _transcribed(*upstream["inputs"].values(), **settings)
        assert loss.item() == pytest.approx(t_loss, rel=1e-5) and chosen.tolist() == pytest.approx(t_chosen, rel=1e-5)
        assert rejected.tolist() == pytest.approx(t_rejected, rel=1e-5)


# ------------------------------------------------------------------------ sequence log-probabilities


@pytest.mark.parametrize("gen", ["v1", "v2"])
def test_sequence_logps_are_the_mean_target_log_probabilities(gen: str) -> None:
    """Per row, -logp(chosen) is the row's own length-normalised training loss (the CE mean over
    its targets), and -logp(rejected) is the loss with the rejected tokens in its place."""
    llm = build_llm(gen).eval()
    batch = llm_batches(1, gen, batch_size=3, seed=4, reject=True)[0]
    # unistream rows for v2 (speech <= 3 x text tokens): 7-8 text tokens, at most 13 speech tokens
    batch["text_token"] = torch.randint(1, 257, (3, 8), generator=torch.Generator().manual_seed(1))
    batch["text_token_len"] = torch.tensor([8, 7, 8], dtype=torch.int32)
    random.seed(0)
    out = sequence_logps(llm, batch, CPU)
    for i in range(3):
        for key, tokens in (("chosen_logps", "speech_token"), ("rejected_logps", "reject_speech_token")):
            n = int(batch[f"{tokens}_len"][i])
            row = {"text_token": batch["text_token"][i:i + 1, :int(batch["text_token_len"][i])],
                   "text_token_len": batch["text_token_len"][i:i + 1], "speech_token": batch[tokens][i:i + 1, :n],
                   "speech_token_len": torch.tensor([n], dtype=torch.int32), "embedding": batch["embedding"][i:i + 1]}
            torch.testing.assert_close(out[key][i], -llm(row, CPU)["loss"], rtol=1e-5, atol=1e-6)
    random.seed(0)
    chosen_only = {k: v for k, v in batch.items() if not k.startswith("reject_")}
    torch.testing.assert_close(out["loss"], llm(chosen_only, CPU)["loss"], rtol=1e-5, atol=1e-6)
    paired = pair_batch(batch)
    assert paired["speech_token"].shape[0] == 6 and torch.equal(paired["text_token"][3:], batch["text_token"])
    with pytest.raises(ValueError, match="reject_speech_token.*dpo-pairs"):
        sequence_logps(llm, chosen_only, CPU)


# ------------------------------------------------------------------------------- the task


def _dpo(gen: str, base: Path, seed: int = 99, **kw) -> DPOTask:
    return DPOTask(llm=build_llm(gen, seed), init_from=str(base), train_conf=TRAIN_CONF, beta=0.5, **kw)


@pytest.mark.parametrize("lora", [False, True])
def test_reference_is_the_base_and_training_separates_the_pairs(tmp_path: Path, lora: bool) -> None:
    base_dir = make_base_dir(tmp_path / "base", "v1")
    task = _dpo("v1", base_dir, lora={"llm": {"r": 4, "alpha": 16}} if lora else None)
    if lora:  # no second copy: the reference is the llm with its adapters off
        assert task.reference is None
        assert sum(p.numel() for p in task.parameters()) < 1.5 * sum(p.numel() for p in base_llm("v1", base_dir).parameters())
    else:
        assert task.reference is not None and not any(p.requires_grad for p in task.reference.parameters())
    batch = llm_batches(1, "v1", seed=0, reject=True)[0]  # the batch LLMBatches trains on

    def margins() -> tuple[torch.Tensor, dict]:
        task.eval()
        with torch.no_grad():
            random.seed(0)
            out = sequence_logps(task.llm, batch, CPU)
        return out["chosen_logps"] - out["rejected_logps"], out

    start, _ = margins()
    trainer = build_trainer(max_steps=12, default_root_dir=str(tmp_path / "run"), logger=False,
                            enable_checkpointing=False, limit_val_batches=0, **QUIET)
    trainer.fit(task, LLMBatches("v1", 1, reject=True))
    losses = trainer.callback_metrics
    end, _ = margins()
    assert bool((end > start).all()), (start, end)  # every pair moved towards its chosen tokens
    assert float(losses["train/dpo_acc"]) == 1.0 and float(losses["train/dpo_loss"]) < math.log(2)
    # the reference did not move: it still computes the base's log-probabilities
    with torch.no_grad(), task.reference_model() as reference:
        random.seed(0)
        ref = sequence_logps(reference, batch, CPU)
    random.seed(0)
    with torch.no_grad():
        base = sequence_logps(base_llm("v1", base_dir), batch, CPU)
    assert torch.equal(ref["chosen_logps"], base["chosen_logps"]) and torch.equal(ref["rejected_logps"],
                                                                                  base["rejected_logps"])
    assert task.llm.training is False  # reference_model() restored the mode it found


def test_at_step_zero_the_loss_is_log2_and_rewards_are_zero(tmp_path: Path) -> None:
    base_dir = make_base_dir(tmp_path / "base", "v2")
    task = _dpo("v2", base_dir, lora={"llm": {"r": 2}}).eval()
    random.seed(3)
    loss = task._shared_step(llm_batches(1, "v2", seed=2, reject=True)[0], "val")
    # no trainer: the logged values are not collected, so recompute from the pieces
    random.seed(3)
    policy = sequence_logps(task.llm, llm_batches(1, "v2", seed=2, reject=True)[0], CPU)
    dpo, chosen, rejected = dpo_loss(policy["chosen_logps"], policy["rejected_logps"], policy["chosen_logps"],
                                     policy["rejected_logps"], beta=0.5)
    assert dpo.item() == pytest.approx(math.log(2), abs=1e-7) and not chosen.any() and not rejected.any()
    assert loss.item() == pytest.approx(math.log(2) + policy["loss"].item(), rel=1e-6)


def test_dpo_resume_equals_uninterrupted_and_keeps_no_reference(tmp_path: Path) -> None:
    base_dir = make_base_dir(tmp_path / "base", "v2")
    straight = _dpo("v2", base_dir)
    build_trainer(max_steps=4, default_root_dir=str(tmp_path / "a"), **QUIET).fit(straight, LLMBatches("v2", 2, True))
    run = tmp_path / "b"
    build_trainer(max_steps=2, default_root_dir=str(run), **QUIET).fit(_dpo("v2", base_dir), LLMBatches("v2", 2, True))
    resumed = _dpo("v2", base_dir, seed=5)
    build_trainer(max_steps=4, default_root_dir=str(run), **QUIET).fit(resumed, LLMBatches("v2", 2, True),
                                                                       ckpt_path="last")
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("reference.") for k in ckpt["state_dict"]) and "llm.llm_decoder.weight" in ckpt["state_dict"]
    reference = torch.load(base_dir / "llm.pt", weights_only=True)
    assert all(torch.equal(resumed.reference.state_dict()[k], v) for k, v in reference.items())
