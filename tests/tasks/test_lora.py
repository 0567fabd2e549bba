"""LoRA fine-tuning in the task: step 0 is the base, only adapters train, checkpoints hold no base,
resume is exact and needs the same base; on real tiny v1/v2/v3 LLMs and a tiny v2 flow."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from cosytrain.tasks.lightning_cli import build_trainer
from cosytrain.tasks.speech_task import FlowTask, LLMTask
from tests.tasks._tiny_llms import LLMBatches, base_llm, build_llm, llm_batches, make_base_dir

# validation on: the epoch-end checkpoint is then written after the epoch completed, which a
# non-resumable loader (these fixed batches) needs for an exact resume
QUIET = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
             num_sanity_val_steps=0)
CPU = torch.device("cpu")
TRAIN_CONF = {"optim": "adam", "optim_conf": {"lr": 0.01}, "scheduler": "constantlr"}


def _lora_task(gen: str, base: Path, seed: int = 99, **lora) -> LLMTask:
    spec = {"r": 4, "alpha": 8, **lora}
    return LLMTask(llm=build_llm(gen, seed), init_from=str(base), train_conf=TRAIN_CONF, lora={"llm": spec})


def _forward(module, batch, seed: int = 0):
    random.seed(seed)  # v2/v3 pick the uni/bistream layout per sample with python's random
    torch.manual_seed(seed)
    return module(batch, CPU)


@pytest.mark.parametrize("gen", ["v1", "v2", "v3"])
def test_step0_is_exactly_the_base_model(tmp_path: Path, gen: str) -> None:
    base_dir = make_base_dir(tmp_path / "base", gen)
    task = _lora_task(gen, base_dir, dropout=0.1).eval()
    base = base_llm(gen, base_dir)
    for batch in llm_batches(2, gen, seed=3):
        ours, theirs = _forward(task.llm, batch), _forward(base, batch)
        assert torch.equal(ours["loss"], theirs["loss"]) and torch.equal(ours["acc"], theirs["acc"])
    # the base weights are the loaded ones (attached after init_from, not before: fish-speech #1163)
    loaded = torch.load(base_dir / "llm.pt", weights_only=True)
    live = task.llm.state_dict()
    for key, value in loaded.items():
        adapted = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(live.get(key, live.get(adapted)), value), key
    # only adapters train; every adapter layer starts with B = 0
    trainable = [n for n, p in task.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(not p.detach().any() for n, p in task.named_parameters() if ".lora_B." in n)
    with pytest.raises(ValueError, match="already carries LoRA adapters"):
        task.adapters.attach(task)
    from cosytrain.tasks.speech_task import load_part_weights

    with pytest.raises(ValueError, match="base weights must load before the adapters attach"):
        load_part_weights("llm", task.llm, base_dir)


def test_lora_needs_init_from_and_a_known_part(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="init_from must name the model directory"):
        LLMTask(llm=build_llm("v1"), lora={"llm": {"r": 4}})
    with pytest.raises(ValueError, match="flow is not a part of this task"):
        LLMTask(llm=build_llm("v1"), init_from=str(tmp_path), lora={"flow": {"r": 4}})
    with pytest.raises(ValueError, match=r"lora.llm: unknown key\(s\) rank"):
        LLMTask(llm=build_llm("v1"), init_from=str(tmp_path), lora={"llm": {"rank": 4}})
    with pytest.raises(FileNotFoundError, match=r"base .*llm\.pt is not there.*resume included"):
        LLMTask(llm=build_llm("v1"), init_from=str(tmp_path / "gone"), lora={"llm": {"r": 4}})
    base_dir = make_base_dir(tmp_path / "base", "v1")
    with pytest.raises(ValueError, match="check target_modules"):
        _lora_task("v1", base_dir, target_modules=["no_such_layer"])
    with pytest.raises(ValueError, match=r"lora.llm.train: 'decoder' names no module of the part"):
        _lora_task("v1", base_dir, train=["decoder"])


def _weights(task: LLMTask) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.state_dict().items()}


def test_adapter_checkpoints_hold_no_base_and_resume_exactly(tmp_path: Path) -> None:
    """v2: 4 steps straight == 2 steps (one epoch) + resume from last.ckpt + 2 (bitwise, adapter dropout on); the
    checkpoint holds the adapters, the unfrozen llm_decoder and the training state, not the base."""
    gen = "v2"
    base_dir = make_base_dir(tmp_path / "base", gen)
    lora = dict(dropout=0.1, train=["llm_decoder"])
    straight = _lora_task(gen, base_dir, **lora)
    before = _weights(straight)
    build_trainer(max_steps=4, default_root_dir=str(tmp_path / "a"), **QUIET).fit(straight, LLMBatches(gen, 2))
    after = _weights(straight)
    frozen = straight.adapters.frozen_keys
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # the base never moves
    moved = [k for k in after if not torch.equal(before[k], after[k])]
    assert moved and all(".lora_" in k or k.startswith("llm.llm_decoder.modules_to_save.") for k in moved)

    run = tmp_path / "b"
    build_trainer(max_steps=2, default_root_dir=str(run), **QUIET).fit(_lora_task(gen, base_dir, **lora),
                                                                       LLMBatches(gen, 2))
    resumed = _lora_task(gen, base_dir, seed=5, **lora)  # other initial weights: everything comes from ckpt + base
    build_trainer(max_steps=4, default_root_dir=str(run), **QUIET).fit(resumed, LLMBatches(gen, 2), ckpt_path="last")
    final = _weights(resumed)
    assert all(torch.equal(after[k], final[k]) for k in after), [k for k in after if not torch.equal(after[k], final[k])]

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert not keys & frozen and not any(".base_layer." in k for k in keys)
    assert {k for k in after if ".lora_" in k or ".modules_to_save." in k} <= keys
    record = ckpt["cosytrain"]["lora"]["llm"]
    assert record["config"]["r"] == 4 and record["init_from"] == str(base_dir) and len(record["base_sha256"]) == 64

    # size: the same run in full SFT keeps the base and Adam's two moments of every weight
    full = LLMTask(llm=build_llm(gen, 99), init_from=str(base_dir), train_conf=TRAIN_CONF)
    build_trainer(max_steps=1, default_root_dir=str(tmp_path / "full"), **QUIET).fit(full, LLMBatches(gen))
    lora_size = (run / "checkpoints" / "last.ckpt").stat().st_size
    full_size = (tmp_path / "full" / "checkpoints" / "last.ckpt").stat().st_size
    trainable = sum(p.numel() for p in resumed.parameters() if p.requires_grad)
    total = sum(p.numel() for p in resumed.parameters())
    assert lora_size < 0.5 * full_size and trainable < 0.35 * total, (lora_size, full_size, trainable, total)


def test_resume_refuses_another_base_or_a_plain_checkpoint(tmp_path: Path) -> None:
    base_dir = make_base_dir(tmp_path / "base", "v1")
    run = tmp_path / "run"
    build_trainer(max_steps=1, default_root_dir=str(run), **QUIET).fit(_lora_task("v1", base_dir), LLMBatches("v1"))
    other = make_base_dir(tmp_path / "other", "v1", seed=8)
    with pytest.raises(ValueError, match=r"other/llm\.pt is not the base these adapters were trained on"):
        build_trainer(max_steps=2, default_root_dir=str(run), **QUIET).fit(_lora_task("v1", other), LLMBatches("v1"),
                                                                           ckpt_path="last")
    plain = tmp_path / "plain"
    build_trainer(max_steps=1, default_root_dir=str(plain), **QUIET).fit(
        LLMTask(llm=build_llm("v1"), train_conf=TRAIN_CONF), LLMBatches("v1"))
    with pytest.raises(ValueError, match="not trained with LoRA adapters"):
        build_trainer(max_steps=2, default_root_dir=str(plain), **QUIET).fit(_lora_task("v1", base_dir),
                                                                             LLMBatches("v1"), ckpt_path="last")


def test_flow_estimator_adapters_start_as_the_base(tmp_path: Path) -> None:
    """LoRA on the v2 flow's estimator (default targets: its attention projections)."""
    import yaml
    from jsonargparse import ArgumentParser

    from tests.tasks._tiny_llms import REPO

    parser = ArgumentParser()
    parser.add_argument("--flow", type=torch.nn.Module)
    config = yaml.safe_load((REPO / "conf/model/flow_v2_tiny.yaml").read_text())

    def flow(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return parser.instantiate_classes(parser.parse_object({"flow": config})).flow

    (tmp_path / "base").mkdir()
    torch.save(flow(3).state_dict(), tmp_path / "base" / "flow.pt")
    task = FlowTask(flow=flow(4), init_from=str(tmp_path / "base"), lora={"flow": {"r": 2}}).eval()
    base = flow(5)
    base.load_state_dict(torch.load(tmp_path / "base" / "flow.pt", weights_only=True))
    g = torch.Generator().manual_seed(0)
    batch = {"speech_token": torch.randint(0, 256, (2, 10), generator=g), "speech_token_len": torch.tensor([10, 8]),
             "speech_feat": torch.randn(2, 20, 80, generator=g), "speech_feat_len": torch.tensor([20, 16]),
             "embedding": torch.randn(2, 192, generator=g)}
    assert torch.equal(_forward(task.flow, batch)["loss"], _forward(base.eval(), batch)["loss"])
    trainable = [n for n, p in task.named_parameters() if p.requires_grad]
    assert trainable and all(".estimator." in n and ".lora_" in n and any(t in n for t in ("to_q", "to_k", "to_v",
                                                                                             "to_out"))
                             for n in trainable)
