"""The lr schedules must reproduce upstream's values step by step (fixture made with upstream's classes)."""

from __future__ import annotations

import pytest
import torch

from cosytrain.tasks.optim import TrainConf, build_optimization
from cosytrain.tasks.schedulers import SCHEDULERS
from tests.conftest import load_fixture


def _lrs(cls_name: str, lr: float, kwargs: dict, steps: int) -> torch.Tensor:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=lr)
    sched = SCHEDULERS[cls_name.lower()](opt, **kwargs)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return torch.tensor(lrs, dtype=torch.float64)


def test_schedulers_match_upstream_fixture():
    fx = load_fixture("scheduler")
    steps = fx["inputs"]["lr"]["steps"]
    assert set(fx["config"]) == set(fx["outputs"]["lr"])
    for case, cfg in fx["config"].items():
        name = cfg["class"].rsplit(".", 1)[-1]
        got = _lrs(name, cfg["lr"], cfg["kwargs"], steps)
        want = fx["outputs"]["lr"][case]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0, msg=f"{case}")


def test_scheduler_state_round_trips():
    """A resumed schedule continues where it stopped (Lightning restores it from state_dict)."""
    fx = load_fixture("scheduler")
    cfg = fx["config"]["noamhold"]
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=cfg["lr"])
    sched = SCHEDULERS["noamholdannealing"](opt, **cfg["kwargs"])
    for _ in range(25):
        opt.step()
        sched.step()
    opt2 = torch.optim.Adam([p], lr=cfg["lr"])
    sched2 = SCHEDULERS["noamholdannealing"](opt2, **cfg["kwargs"])
    sched2.load_state_dict(sched.state_dict())
    opt2.load_state_dict(opt.state_dict())
    for _ in range(5):
        opt.step(); sched.step(); opt2.step(); sched2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == fx["outputs"]["lr"]["noamhold"][30].item()


def test_train_conf_from_upstream_keys_and_errors():
    p = torch.nn.Parameter(torch.zeros(2))
    out = build_optimization([p], {"optim": "adamw", "optim_conf": {"lr": 1e-5, "weight_decay": 0.01},
                                   "scheduler": "constantlr", "scheduler_conf": {"warmup_steps": 2500}})
    assert isinstance(out["optimizer"], torch.optim.AdamW)
    assert out["lr_scheduler"]["interval"] == "step"
    assert out["optimizer"].param_groups[0]["weight_decay"] == 0.01
    with pytest.raises(ValueError, match="trainer.max_epochs"):
        TrainConf.from_dict({"max_epoch": 200})
    with pytest.raises(ValueError, match="unknown key"):
        TrainConf.from_dict({"optimiser": "adam"})
    with pytest.raises(ValueError, match="lamb"):  # sgd became a known optimizer (issue 11)
        TrainConf.from_dict({"optim": "lamb"})


def test_train_conf_values_typed_on_the_command_line_become_numbers(tmp_path):
    """``--model.init_args.train_conf.optim_conf.lr 2e-3`` reaches the task as the string '2e-3'."""
    from cosytrain.errors import ConfigurationError

    p = torch.nn.Parameter(torch.zeros(2))
    out = build_optimization([p], {"optim": "adam", "optim_conf": {"lr": "2e-3", "betas": "[0.8, 0.99]"},
                                   "scheduler": "warmuplr", "scheduler_conf": {"warmup_steps": "10"},
                                   "grad_clip": "1.5", "accum_grad": "2"})
    group = out["optimizer"].param_groups[0]
    assert group["initial_lr"] == 2e-3 and group["betas"] == [0.8, 0.99]
    assert out["lr_scheduler"]["scheduler"].warmup_steps == 10
    conf = TrainConf.from_dict({"grad_clip": "1.5", "accum_grad": "2"})
    assert conf.grad_clip == 1.5 and conf.accum_grad == 2
    with pytest.raises(ConfigurationError, match=r"optim_conf=.*'fast'.*adam"):
        build_optimization([p], {"optim": "adam", "optim_conf": {"lr": "fast"}})
    with pytest.raises(ConfigurationError, match=r"scheduler_conf=.*warmuplr"):
        build_optimization([p], {"scheduler": "warmuplr", "scheduler_conf": {"warmup_step": 5}})
