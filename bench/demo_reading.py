"""Does the demo LLM read its sentence? Phone error rate of its free-running speech tokens.

The demo corpus's speech tokens are phones (and the half of the phone) from espeak-ng's alignment
(``cosytrain/data/alignment_tokens.py``), so the tokens an LLM generates from text can be read back as
phones and compared with the phones of the recording, like an ASR's word error rate but with no ASR:
consecutive repeats collapse into one phone, pauses are dropped, ``jiwer`` counts the edits. Teacher-forced
accuracy (``val/llm_acc``) does not say this: an LLM can score well on it and still skip or repeat words
when it runs on its own.

    python bench/demo_reading.py runs/sft checkpoints/last.ckpt --num 10 --samplers greedy,ras,top_k3
        [--modes sft,zero_shot]

``run`` is a run folder (its ``config.yaml`` names the LLM and the data); the held-out utterances are the
first of each voice in the validation shard. Prints, per sampler and mode, the phone error rate, the
duration ratio (generated / recorded tokens), the utterances where the LLM failed, and two examples.
``zero_shot`` reads each utterance with another held-out utterance of its voice as the prompt (its text,
speech tokens and embedding, as upstream's zero-shot mode); only the tokens after the prompt are scored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PAUSES = {"_", "_:", "_!", "<sil>"}


def phones(tokens: list[int], names: list[str], states: int) -> list[str]:
    """Collapse a token sequence to its phones (repeats merged, pauses dropped)."""
    out: list[str] = []
    last = None
    for t in tokens:
        p = int(t) // states
        if p != last:
            last = p
            name = names[p] if p < len(names) else f"?{p}"
            if name not in PAUSES:
                out.append(name)
    return out


def samplers() -> dict:
    import functools

    from cosytrain.models import sampling as S

    return {"ras": S.ras_sampling, "greedy": S.greedy_sampling,
            "top_k3": lambda w, d, s: S.nucleus_sampling(w, 0.8, 3),
            "ras_tau0.5": functools.partial(S.ras_sampling, tau_r=0.5)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("ckpt", type=Path, help="a checkpoint of that run (relative to the run folder or absolute)")
    p.add_argument("--num", type=int, default=10)
    p.add_argument("--samplers", default="ras,greedy,top_k3")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", default="sft", help="sft and/or zero_shot (needs 2 utterances per voice)")
    a = p.parse_args()

    import jiwer
    import torch
    import yaml

    from cosytrain.data.alignment_tokens import DEFAULT_STATES, AlignmentSpeechTokenizer
    from cosytrain.data.datamodule import DemoDataModule
    from cosytrain.data.demo_corpus import ALIGNMENT_FILE, default_root
    from cosytrain.export.trained_weights import checkpoint_parts
    from cosytrain.tasks.part_config import instantiate_part
    from demo_flow_probe import held_out

    torch.set_num_threads(a.threads)
    cfg = yaml.safe_load((a.run / "config.yaml").read_text())
    llm = instantiate_part(cfg["model"]["init_args"]["llm"])
    ckpt = a.ckpt if a.ckpt.is_absolute() else a.run / a.ckpt
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    llm.load_state_dict(checkpoint_parts(checkpoint, str(ckpt)).states["llm"])  # EMA/LoRA as the export takes them
    llm.eval()
    data = dict(cfg["data"]["init_args"])
    root = Path(data["root"]) if data.get("root") else default_root()
    data["num_workers"] = 0
    dm = DemoDataModule(**data)
    dm.setup("fit")
    items = held_out(dm, root, a.num, per_voice=(a.num + 4) // 5)
    names = AlignmentSpeechTokenizer.load(root / "kaldi" / ALIGNMENT_FILE, int(data.get("token_rate", 50))).phones
    empty = torch.zeros(1, 0, dtype=torch.int32)
    prompts = {}  # zero-shot: the next held-out utterance of the same voice, round the voice's list
    by_voice: dict[str, list] = {}
    for it in items:
        by_voice.setdefault(it.spk, []).append(it)
    for group in by_voice.values():
        for k, it in enumerate(group):
            prompts[it.utt] = group[(k + 1) % len(group)] if len(group) > 1 else None

    def run(it, mode: str) -> list[int]:
        text = it.text_token.to(torch.int32)
        prompt = prompts[it.utt] if mode == "zero_shot" else None
        if mode == "zero_shot" and prompt is None:
            raise RuntimeError("no other held-out utterance of this voice to prompt with (raise --num)")
        p_text = empty if prompt is None else prompt.text_token.to(torch.int32)
        p_speech = empty if prompt is None else prompt.speech_token.to(torch.int32)
        with torch.no_grad():
            return list(llm.inference(text=text, text_len=torch.tensor([text.shape[1]]), prompt_text=p_text,
                                      prompt_text_len=torch.tensor([p_text.shape[1]]), prompt_speech_token=p_speech,
                                      prompt_speech_token_len=torch.tensor([p_speech.shape[1]]),
                                      embedding=(prompt or it).embedding.float()))

    for name in a.samplers.split(","):
        llm.sampling = samplers()[name]
        for mode in a.modes.split(","):
            refs, hyps, ratios, failed = [], [], [], []
            for i, it in enumerate(items):
                torch.manual_seed(1986 + i)
                try:
                    tokens = run(it, mode)
                except RuntimeError as exc:
                    failed.append(f"{it.utt}: {exc}")
                    tokens = []
                refs.append(" ".join(phones(it.speech_token[0].tolist(), names, DEFAULT_STATES)))
                hyps.append(" ".join(phones(tokens, names, DEFAULT_STATES)) or "-")
                ratios.append(len(tokens) / it.speech_token.shape[1])
            print(f"{name:12s} {mode:9s} phone error rate {jiwer.wer(refs, hyps):.3f}  duration ratio "
                  f"{sum(ratios) / len(ratios):.2f}  failed {len(failed)} of {len(items)}", flush=True)
            for f in failed:
                print("   failed", f)
            for it, r, h in list(zip(items, refs, hyps))[:2]:
                print(f"   {it.text}\n     recorded  {r}\n     generated {h}")


if __name__ == "__main__":
    main()
