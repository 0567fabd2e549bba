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
        [--set decoder.init_args.cfm_params.inference_cfg_rate=2.0] [--root CORPUS]
        [--per_voice 1] [--spks spk1_usm,spk2_usf] [--ema 0.99,0.995] [--bias_init mel_mean]
        [--t_sampling uniform|logit_normal|cosine] [--prior_loss 0.5]

Training-only variants (the model, its classes and its inference stay upstream's): ``--ema`` also
measures exponential moving averages of the weights; ``--bias_init mel_mean`` starts the
estimator's output bias (and the encoder projection's) at the training mel's per-bin mean, the
mean of the target velocity; ``--t_sampling`` draws the training time from another law than
upstream's uniform; ``--prior_loss`` adds Matcha's L2 between the encoder output and the mel.
``train s`` is wall time, ``cpu s`` the process's CPU time (the fair figure on a shared machine).
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
    import yaml

    from cosytrain.tasks.part_config import instantiate_part

    conf = yaml.safe_load(path.read_text())
    for item in overrides:  # dotted.path=value under init_args
        key, _, value = item.partition("=")
        node = conf["init_args"]
        *parents, leaf = key.split(".")
        for k in parents:
            node = node[k]
        node[leaf] = yaml.safe_load(value)
    return instantiate_part(conf)


def held_out(dm, root: Path, count: int, per_voice: int = 1, spks: tuple[str, ...] = ()):
    """The first ``per_voice`` utterances of each voice (of ``spks`` when given) in the validation shard,
    at most ``count``, as SynthesisItems with their wavs."""
    import soundfile as sf
    import torch

    from cosytrain.evaluation.synthesis import SynthesisItem

    items, seen = [], {}
    for batch in dm.val_dataloader():
        for i, utt in enumerate(batch["utts"]):
            spk = utt.rsplit("_", 1)[0]
            if seen.get(spk, 0) >= per_voice or (spks and spk not in spks):
                continue
            seen[spk] = seen.get(spk, 0) + 1

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


def train_mel_mean(dm, n_mels: int):
    """Per-bin mean of the training mels over valid frames."""
    import torch

    total, frames = torch.zeros(n_mels), 0
    for batch in dm.train_dataloader():
        for i in range(len(batch["utts"])):
            mel = batch["speech_feat"][i, :int(batch["speech_feat_len"][i])]
            total += mel.sum(0)
            frames += mel.shape[0]
    return total / max(frames, 1)


def make_train_loss(flow, t_sampling: str, prior_loss: float):
    """The flow's training loss, with the probe's training-only variants (the defaults call ``flow(batch)``).

    The variants re-implement ``MaskedDiffWithXvec.forward`` + ``ConditionalCFM.compute_loss`` with a
    different draw of t and/or an extra L2 between the length-regulated encoder output and the mel;
    the model and its inference are unchanged.
    """
    import torch
    import torch.nn.functional as F

    from cosytrain.models.flow.flow import random_prompt_conds
    from cosytrain.models.transformer.mask import make_pad_mask

    if t_sampling == "uniform" and prior_loss == 0:
        return lambda batch, device: flow(batch, device)["loss"]

    def draw_t(b):
        u = torch.rand([b, 1, 1])
        if t_sampling == "logit_normal":
            return torch.sigmoid(torch.randn([b, 1, 1]))
        if t_sampling == "cosine":
            return 1 - torch.cos(u * 0.5 * torch.pi)
        return u

    def loss_fn(batch, device):
        token, token_len = batch["speech_token"], batch["speech_token_len"]
        feat, feat_len = batch["speech_feat"], batch["speech_feat_len"]
        spks = flow.embed_speaker(batch["embedding"])
        h, _ = flow.encoder(flow.embed_tokens(token, token_len), token_len)
        h, _ = flow.length_regulator(flow.encoder_proj(h), feat_len)
        conds = random_prompt_conds(feat, feat_len).transpose(1, 2)
        mask = (~make_pad_mask(feat_len)).to(h).unsqueeze(1)
        cfm = flow.decoder
        x1, mu = feat.transpose(1, 2).float(), h.transpose(1, 2)
        b = mu.shape[0]
        t = draw_t(b)
        z = torch.randn_like(x1)
        y = (1 - (1 - cfm.sigma_min) * t) * z + t * x1
        u = x1 - (1 - cfm.sigma_min) * z
        mu_in, spks_in, cond_in = mu, spks, conds
        if cfm.training_cfg_rate > 0:
            keep = torch.rand(b) > cfm.training_cfg_rate
            mu_in, spks_in = mu * keep.view(-1, 1, 1), spks * keep.view(-1, 1)
            cond_in = conds * keep.view(-1, 1, 1)
        pred = cfm.estimator(y, mask, mu_in, t.squeeze(), spks_in, cond_in)
        denom = mask.sum() * u.shape[1]
        loss = F.mse_loss(pred * mask, u * mask, reduction="sum") / denom
        if prior_loss > 0:
            loss = loss + prior_loss * F.mse_loss(mu * mask, x1 * mask, reduction="sum") / denom
        return loss

    return loss_fn


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
    p.add_argument("--per_voice", type=int, default=1, help="held-out utterances per voice (default 1)")
    p.add_argument("--spks", default="", help="comma-separated voices to measure on (default: all)")
    p.add_argument("--root", default=None, help="demo corpus folder (default: the cache)")
    p.add_argument("--seed", type=int, default=1986)
    p.add_argument("--ema", default="",
                   help="comma-separated EMA decays; each average is measured too, e.g. 0.99,0.995")
    p.add_argument("--bias_init", choices=("none", "mel_mean"), default="none",
                   help="mel_mean: the estimator's final_proj bias (and encoder_proj bias) start at the training "
                        "mel's per-bin mean, the mean of the target velocity x1 - z (training-only initialisation)")
    p.add_argument("--t_sampling", choices=("uniform", "logit_normal", "cosine"), default="uniform",
                   help="training time draw: uniform (upstream), logit-normal(0,1) (SD3), or 1-cos(pi/2 u) "
                        "(denser near t=0, as the inference grid)")
    p.add_argument("--prior_loss", type=float, default=0.0,
                   help="weight of a training-only L2 between the encoder output mu and the target mel (Matcha)")
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
    def datamodule(max_frames: int):
        dm = DemoDataModule(root=str(root), token_rate=50, val_shards=1, sample_rate=22050, text_tokenizer="byte",
                            speech_token_size=256, batch_type="dynamic", max_frames_in_batch=max_frames,
                            shuffle_size=100, sort_size=50, num_workers=0)
        dm.setup("fit")
        return dm

    dm = datamodule(a.max_frames)
    # the held-out set is picked from 2000-frame validation batches whatever --max_frames is, so runs
    # with other batch sizes are measured on the same utterances
    eval_dm = dm if a.max_frames == 2000 else datamodule(2000)
    random.seed(a.seed), np.random.seed(a.seed), torch.manual_seed(a.seed)
    flow = build_flow(Path(a.flow), a.set)
    items = held_out(eval_dm, root, a.utterances, a.per_voice, tuple(s for s in a.spks.split(",") if s))
    train_loss = make_train_loss(flow, a.t_sampling, a.prior_loss)
    vocoder, encoder = GriffinLimVocoder(), load_speaker_encoder("resemblyzer")
    rows: list[tuple[str, dict]] = []

    def measure(results, condition):
        return average(score(results, encoder))[condition]

    floor, lookup = [], []
    torch.manual_seed(a.seed)  # Griffin-Lim's random initial phases: the same in every run, whatever the model
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

    if a.bias_init == "mel_mean":
        mel_mean = train_mel_mean(dm, flow.output_size)
        with torch.no_grad():
            flow.decoder.estimator.final_proj.bias.copy_(mel_mean)
            flow.encoder_proj.bias.copy_(mel_mean)
    emas = {float(d): torch.optim.swa_utils.AveragedModel(
        flow, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(float(d))) for d in a.ema.split(",") if d}

    opt = build_optimization(flow.parameters(), {"optim": "adam", "optim_conf": {"lr": a.lr}, "scheduler": "warmuplr",
                                                 "scheduler_conf": {"warmup_steps": a.warmup}})
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    eval_at = {int(s) for s in a.eval_at.split(",") if s}
    device, step, start, losses = torch.device("cpu"), 0, time.perf_counter(), []
    cpu_start = time.process_time()
    flow.train()
    while step < a.steps:
        for batch in dm.train_dataloader():
            loss = train_loss(batch, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
            for ema in emas.values():
                ema.update_parameters(flow)
            step += 1
            losses.append(float(loss.detach()))
            if step in eval_at or step == a.steps:
                train_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
                rng = torch.get_rng_state()  # measuring must not change the training draws that follow
                for name, model in [("flow", flow)] + [(f"EMA {d:g}", e.module) for d, e in emas.items()]:
                    torch.manual_seed(a.seed)  # the same inference noise for every row
                    results = synthesize_items(items, vocoder=vocoder, flow=model, conditions=("flow_gt",))
                    figures = measure(results, "flow_gt")
                    figures["loss"] = float(np.mean(losses[-50:]))
                    figures["train_s"], figures["cpu_s"] = train_s, cpu_s
                    rows.append((f"{name} on true tokens @ step {step}", figures))
                    print(f"{rows[-1][0]}: MCD {figures['mcd']:.2f} SIM {figures.get('sim', float('nan')):.2f} "
                          f"loss {figures['loss']:.2f} cpu {cpu_s:.0f} s", file=sys.stderr, flush=True)
                torch.set_rng_state(rng)
                start = time.perf_counter() - train_s  # measuring is not training time
                cpu_start = time.process_time() - cpu_s
                flow.train()
            if step >= a.steps:
                break

    base = rows[0][1]["mcd"]
    print(f"demo flow probe: {len(items)} held-out utterances, flow {Path(a.flow).name} "
          f"({sum(p.numel() for p in flow.parameters()) / 1e6:.2f} M params), lr {a.lr} warmup {a.warmup}, "
          f"{a.max_frames} frames/batch, {a.threads} thread(s){', ' + ' '.join(a.set) if a.set else ''}")
    print(f"options: ema {a.ema or '-'}, bias_init {a.bias_init}, t_sampling {a.t_sampling}, "
          f"prior_loss {a.prior_loss:g}, seed {a.seed}")
    print(f"{'condition':42s} {'MCD dB':>7s} {'x floor':>7s} {'lf0 c':>6s} {'VDE':>5s} {'SIM':>5s} {'loss':>6s} "
          f"{'train s':>7s} {'cpu s':>6s}")
    for name, f in rows:
        print(f"{name:42s} {f['mcd']:7.2f} {f['mcd'] / base:7.2f} {f['lf0_rmse']:6.0f} {f['vde']:5.2f} "
              f"{f.get('sim', float('nan')):5.2f} {f.get('loss', float('nan')):6.2f} "
              f"{f.get('train_s', float('nan')):7.0f} {f.get('cpu_s', float('nan')):6.0f}")
    print(json.dumps({name: {k: round(v, 4) for k, v in f.items()} for name, f in rows}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
