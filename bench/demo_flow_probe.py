"""How far is the demo flow from the floor, and what bounds it? Flow-only training on the demo corpus.

The demo's full synthesis can be no better than the flow on the recording's own speech tokens
(``flow_gt``), which can be no better than the vocoder on the recording's mel (the floor). This
script trains the flow ALONE (``conf/model/flow_v1_small.yaml`` by default, the recipe's optimiser
and schedule: Adam, upstream's ``warmuplr``, grad clip 5) on the demo corpus's training shards and
measures, on held-out utterances (the first of each voice in the validation shard), with the
synthesis metrics of :mod:`cosytrain.evaluation.synthesis` and Griffin-Lim as the vocoder:

* ``vocoder floor``: Griffin-Lim on the true mel;
* ``token lookup``: a mel made by looking up, for every frame, the mean training mel of its speech
  token (no model, no training: what the demo k-means tokens alone say about the mel, a bound on
  how informative the flow's input is);
* ``flow @ step N``: the flow on the true tokens after N steps (the inference path of ``synthesize``).

Every ratio is the row's MCD over the floor's MCD, measured in the same run. A plain PyTorch loop
(no Lightning: this probes the model and schedule, the task adds nothing to them), one process.

    python bench/demo_flow_probe.py [--steps 600] [--eval_at 300,600] [--lr 1e-3] [--warmup 200]
        [--flow conf/model/flow_v1_small.yaml] [--max_frames 2000] [--utterances 5] [--threads 1]
        [--set decoder.init_args.cfm_params.inference_cfg_rate=2.0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_flow(path: Path, overrides: list[str]):
    import torch
    import yaml
    from jsonargparse import ArgumentParser

    conf = yaml.safe_load(path.read_text())
    for item in overrides:  # dotted.path=value under init_args
        key, _, value = item.partition("=")
        node = conf["init_args"]
        *parents, leaf = key.split(".")
        for k in parents:
            node = node[k]
        node[leaf] = yaml.safe_load(value)
    parser = ArgumentParser(parser_mode="omegaconf")
    parser.add_argument("--part", type=torch.nn.Module)
    return parser.instantiate(parser.parse_object({"part": conf})).part


def held_out(dm, root: Path, count: int):
    """The first utterance of each voice in the validation shard, as SynthesisItems with their wavs."""
    import soundfile as sf
    import torch

    from cosytrain.evaluation.synthesis import SynthesisItem

    items, seen = [], set()
    for batch in dm.val_dataloader():
        for i, utt in enumerate(batch["utts"]):
            spk = utt.rsplit("_", 1)[0]
            if spk in seen:
                continue
            seen.add(spk)

            def cut(key):
                value, length = batch[key][i:i + 1], batch[f"{key}_len"][i]
                return value[:, :int(length)].clone()

            wav, rate = sf.read(root / "wavs" / f"{utt}.wav", dtype="float32")
            items.append(SynthesisItem(utt=utt, spk=spk, text=batch["text"][i], text_token=cut("text_token"),
                                       speech_token=cut("speech_token"), speech_feat=cut("speech_feat"),
                                       embedding=batch["embedding"][i:i + 1].float().clone(),
                                       wav=torch.from_numpy(wav), sample_rate=rate))
        if len(items) >= count:
            break
    return sorted(items, key=lambda it: it.utt)[:count]


def token_lookup_table(dm, vocab: int, n_mels: int):
    """Mean training mel per speech token (frames mapped to tokens by position, as the length regulator)."""
    import torch

    sums, counts = torch.zeros(vocab, n_mels), torch.zeros(vocab)
    for batch in dm.train_dataloader():
        for i in range(len(batch["utts"])):
            tok = batch["speech_token"][i, :int(batch["speech_token_len"][i])]
            mel = batch["speech_feat"][i, :int(batch["speech_feat_len"][i])]
            index = (torch.arange(mel.shape[0]) * tok.shape[0] // mel.shape[0]).clamp(max=tok.shape[0] - 1)
            sums.index_add_(0, tok[index], mel)
            counts.index_add_(0, tok[index], torch.ones(len(index)))
    return sums / counts.clamp_min(1)[:, None]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flow", default=str(REPO / "conf" / "model" / "flow_v1_small.yaml"))
    p.add_argument("--set", action="append", default=[], help="override under the flow's init_args, dotted=value")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval_at", default="300,600")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--max_frames", type=int, default=2000)
    p.add_argument("--utterances", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--root", default=None, help="demo corpus folder (default: the cache)")
    p.add_argument("--seed", type=int, default=1986)
    a = p.parse_args()

    import random

    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    from cosytrain.data.datamodule import DemoDataModule
    from cosytrain.data.demo_corpus import default_root
    from cosytrain.evaluation.speaker_similarity import load_speaker_encoder
    from cosytrain.evaluation.synthesis import SynthesisResult, average, score, synthesize_items
    from cosytrain.inference.griffin_lim import GriffinLimVocoder
    from cosytrain.tasks.optim import build_optimization

    root = Path(a.root) if a.root else default_root()
    dm = DemoDataModule(root=str(root), token_rate=50, val_shards=1, sample_rate=22050, text_tokenizer="byte",
                        speech_token_size=256, batch_type="dynamic", max_frames_in_batch=a.max_frames,
                        shuffle_size=100, sort_size=50, num_workers=0)
    dm.setup("fit")
    random.seed(a.seed), np.random.seed(a.seed), torch.manual_seed(a.seed)
    flow = build_flow(Path(a.flow), a.set)
    items = held_out(dm, root, a.utterances)
    vocoder, encoder = GriffinLimVocoder(), load_speaker_encoder("resemblyzer")
    rows: list[tuple[str, dict]] = []

    def measure(results, condition):
        return average(score(results, encoder))[condition]

    floor, lookup = [], []
    table = token_lookup_table(dm, flow.vocab_size, flow.output_size)
    for it in items:
        mel = it.speech_feat[0]
        tok = it.speech_token[0]
        index = (torch.arange(mel.shape[0]) * tok.shape[0] // mel.shape[0]).clamp(max=tok.shape[0] - 1)
        for results, m in ((floor, mel), (lookup, table[tok[index]])):
            r = SynthesisResult(item=it, sample_rate=vocoder.sampling_rate)
            r.wavs["x"] = vocoder.inference(m.T[None])[0][0]
            results.append(r)
    rows.append(("vocoder floor (Griffin-Lim, true mel)", measure(floor, "x")))
    rows.append(("token lookup (mean mel per token)", measure(lookup, "x")))

    opt = build_optimization(flow.parameters(), {"optim": "adam", "optim_conf": {"lr": a.lr}, "scheduler": "warmuplr",
                                                 "scheduler_conf": {"warmup_steps": a.warmup}})
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    eval_at = {int(s) for s in a.eval_at.split(",") if s}
    device, step, start, losses = torch.device("cpu"), 0, time.perf_counter(), []
    flow.train()
    while step < a.steps:
        for batch in dm.train_dataloader():
            loss = flow(batch, device)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(float(loss.detach()))
            if step in eval_at or step == a.steps:
                train_s = time.perf_counter() - start
                results = synthesize_items(items, vocoder=vocoder, flow=flow, conditions=("flow_gt",))
                figures = measure(results, "flow_gt")
                figures["loss"] = float(np.mean(losses[-50:]))
                figures["train_s"] = train_s
                rows.append((f"flow on true tokens @ step {step}", figures))
                start = time.perf_counter() - train_s  # measuring is not training time
                flow.train()
            if step >= a.steps:
                break

    base = rows[0][1]["mcd"]
    print(f"demo flow probe: {len(items)} held-out utterances, flow {Path(a.flow).name} "
          f"({sum(p.numel() for p in flow.parameters()) / 1e6:.2f} M params), lr {a.lr} warmup {a.warmup}, "
          f"{a.max_frames} frames/batch, {a.threads} thread(s){', ' + ' '.join(a.set) if a.set else ''}")
    print(f"{'condition':42s} {'MCD dB':>7s} {'x floor':>7s} {'lf0 c':>6s} {'VDE':>5s} {'SIM':>5s} {'loss':>6s} {'train s':>7s}")
    for name, f in rows:
        print(f"{name:42s} {f['mcd']:7.2f} {f['mcd'] / base:7.2f} {f['lf0_rmse']:6.0f} {f['vde']:5.2f} "
              f"{f.get('sim', float('nan')):5.2f} {f.get('loss', float('nan')):6.2f} {f.get('train_s', float('nan')):7.0f}")
    print(json.dumps({name: {k: round(v, 4) for k, v in f.items()} for name, f in rows}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
