"""CosyVoice 2/3 text-to-speech-token LMs on a HuggingFace Qwen2 backbone.

``Qwen2Encoder`` wraps ``transformers.Qwen2ForCausalLM`` under the attribute ``model``, so the
state-dict keys are upstream's (``llm.model.model.embed_tokens.weight``, the tied
``llm.model.lm_head.weight``, ...). ``Qwen2LM`` (v2) and ``CosyVoice3LM`` (v3) follow upstream
``cosyvoice/llm/llm.py``: constructor arguments, submodule names, the training layouts
(unistream ``[sos, instruct, text, task_id, speech]`` and the 5:15 text/speech interleaved
"bistream" layout picked per sample with python ``random``), the loss and the sampling loops.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable, Generator, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence, unpad_sequence

from cosytrain.models.common import IGNORE_ID
from cosytrain.models.llm.transformer_lm import TransformerLM
from cosytrain.models.transformer.label_smoothing_loss import LabelSmoothingLoss
from cosytrain.models.transformer.mask import make_pad_mask

from cosytrain.errors import ConfigurationError

logger = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def build_qwen2(pretrain_path: str) -> nn.Module:
    """A ``Qwen2ForCausalLM`` from a HF folder; from its config alone when it holds no weights.

    Upstream always calls ``from_pretrained``. A CosyVoice ``llm.pt`` overwrites every Qwen weight
    anyway, so a folder with only ``config.json`` (or a build on the meta device, where loading
    weights would be wasted) gives a randomly initialised model of the right shape instead.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = Path(pretrain_path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"Qwen2Encoder: no config.json in {folder}; set qwen_pretrain_path to the model's CosyVoice-BlankEN folder"
        )
    on_meta = torch.empty(0).device.type == "meta"
    if not on_meta and any((folder / name).is_file() for name in _WEIGHT_FILES):
        return Qwen2ForCausalLM.from_pretrained(str(folder), local_files_only=True)
    if not on_meta:
        logger.info("Qwen2Encoder: %s has no weights; building Qwen2 from its config (random init)", folder)
    return Qwen2ForCausalLM(Qwen2Config.from_pretrained(str(folder), local_files_only=True))


class Qwen2Encoder(nn.Module):
    """Qwen2 used as a causal encoder over input embeddings; returns the final-norm hidden states."""

    def __init__(self, pretrain_path: str):
        super().__init__()
        self.model = build_qwen2(pretrain_path)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """xs (B, T, D) right-padded, xs_lens (B,) -> hidden (B, T, D), mask (B, 1, T).

        Upstream runs the full causal LM with ``output_hidden_states`` and keeps
        ``hidden_states[-1]``, which is the inner model's ``last_hidden_state`` (after the final
        RMSNorm). Calling the inner model gives the same numbers without the unused
        vocab-sized ``lm_head`` projection.
        """
        masks = ~make_pad_mask(xs_lens, xs.size(1))
        out = self.model.model(inputs_embeds=xs, attention_mask=masks, return_dict=True)
        return out.last_hidden_state, masks.unsqueeze(1)

    def forward_one_step(self, xs: torch.Tensor, masks: torch.Tensor, cache=None):
        """Incremental step: xs (1, T_new, D), masks (1, T_all, T_all) causal; returns (hidden, cache)."""
        out = self.model.model(
            inputs_embeds=xs, attention_mask=masks[:, -1, :], past_key_values=cache, use_cache=True, return_dict=True
        )
        return out.last_hidden_state, out.past_key_values


def _cache_len(cache) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


class Qwen2LM(TransformerLM):
    """CosyVoice 2 LLM: ``[sos, text, task_id, speech]`` over Qwen2, 3 special output classes.

    sos/task_id are rows 0/1 of ``llm_embedding``; eos = ``speech_token_size``, fill =
    ``speech_token_size + 2`` (the ``+1`` class is unused upstream).
    """

    num_special = 3

    def __init__(
        self,
        llm_input_size: int,
        llm_output_size: int,
        speech_token_size: int,
        llm: nn.Module,
        sampling: Callable,
        length_normalized_loss: bool = True,
        lsm_weight: float = 0.0,
        mix_ratio: Sequence[int] = (5, 15),
    ):
        nn.Module.__init__(self)
        self.llm_input_size = llm_input_size
        self.llm_output_size = llm_output_size
        self.speech_token_size = speech_token_size
        self._set_special_ids()
        self._build_special_embedding()
        self.llm = llm
        self.llm_decoder = self._build_decoder(llm_output_size)
        self.criterion_ce = LabelSmoothingLoss(
            size=self.num_classes, padding_idx=IGNORE_ID, smoothing=lsm_weight,
            normalize_length=length_normalized_loss,
        )
        self.speech_embedding = nn.Embedding(self.num_classes, llm_input_size)
        self.sampling = sampling
        if len(mix_ratio) != 2 or min(mix_ratio) <= 0:
            raise ConfigurationError(f"mix_ratio must be two positive ints [text, speech], got {mix_ratio!r}")
        self.mix_ratio = [int(mix_ratio[0]), int(mix_ratio[1])]
        # every class >= speech_token_size ends unistream generation (upstream's vllm stop ids)
        self.stop_token_ids = [speech_token_size + i for i in range(self.num_special)]

    # ------------------------------------------------------------------ generation-specific parts
    @property
    def num_classes(self) -> int:
        return self.speech_token_size + self.num_special

    def _set_special_ids(self) -> None:
        self.sos = 0
        self.task_id = 1
        self.eos_token = self.speech_token_size
        self.fill_token = self.speech_token_size + 2

    def _build_special_embedding(self) -> None:
        self.llm_embedding = nn.Embedding(2, self.llm_input_size)

    def _build_decoder(self, llm_output_size: int) -> nn.Linear:
        return nn.Linear(llm_output_size, self.num_classes)

    def _special_emb(self, index: int) -> torch.Tensor:
        """(1, 1, D) embedding of sos or task_id."""
        return self.llm_embedding.weight[index].reshape(1, 1, -1)

    def _text_emb(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.llm.model.model.embed_tokens(tokens)

    # ------------------------------------------------------------------ training
    def prepare_lm_input_target(
        self,
        sos_emb: torch.Tensor,
        text_token: torch.Tensor,
        text_token_emb: torch.Tensor,
        text_token_len: torch.Tensor,
        task_id_emb: torch.Tensor,
        speech_token: torch.Tensor,
        speech_token_emb: torch.Tensor,
        speech_token_len: torch.Tensor,
        instruct_token: Optional[torch.Tensor] = None,
        instruct_token_emb: Optional[torch.Tensor] = None,
        instruct_token_len: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample uni- or bistream layout; returns (lm_target, lm_input, lm_input_len), padded with -1.

        Exactly one ``random.random()`` is drawn per sample, in batch order, *before* the length
        ratio test (upstream's ``random.random() < 0.5 and ratio > 15/5``), so seeded runs pick
        the same layouts as upstream.
        """
        batch = text_token.size(0)
        text_lens_cpu, speech_lens_cpu = text_token_len.cpu(), speech_token_len.cpu()
        speeches = unpad_sequence(speech_token, speech_lens_cpu, batch_first=True)
        text_embs = unpad_sequence(text_token_emb, text_lens_cpu, batch_first=True)
        speech_embs = unpad_sequence(speech_token_emb, speech_lens_cpu, batch_first=True)
        if instruct_token is not None and instruct_token_emb is not None and instruct_token_len is not None:
            instruct_embs = unpad_sequence(instruct_token_emb, instruct_token_len.cpu(), batch_first=True)
            instruct_lens = [int(n) for n in instruct_token_len.cpu()]
        else:
            # Upstream uses torch.empty(0, 896) here, so Qwen2LM training only works at width 896
            # (reference README section E). We use the model's own width: identical at 896.
            empty = text_token_emb.new_zeros(0, text_token_emb.size(-1))
            instruct_embs, instruct_lens = [empty] * batch, [0] * batch
        sos, task_id = sos_emb.reshape(1, -1), task_id_emb.reshape(1, -1)
        n_text, n_speech = self.mix_ratio

        inputs: List[torch.Tensor] = []
        targets: List[torch.Tensor] = []
        for i in range(batch):
            t_len = int(text_lens_cpu[i])
            speech = speeches[i].tolist()
            coin = random.random() < 0.5  # drawn for every sample, even when the ratio test fails
            # same float32 tensor division as upstream, so the ratio test rounds identically
            if coin and bool(speech_lens_cpu[i] / text_lens_cpu[i] > n_speech / n_text):
                target = [IGNORE_ID] * (1 + instruct_lens[i])
                parts = [sos, instruct_embs[i]]
                for j in range((t_len + n_text) // n_text):  # ceil((t_len + 1) / n_text) chunks, last one partial
                    t0, s0 = j * n_text, j * n_speech
                    if t0 + n_text <= t_len:
                        if s0 + n_speech > len(speech):
                            raise ValueError(f"bistream chunk {j} of sample {i} lacks {n_speech} speech tokens")
                        target += [IGNORE_ID] * (n_text - 1) + speech[s0:s0 + n_speech] + [self.fill_token]
                        parts += [text_embs[i][t0:t0 + n_text], speech_embs[i][s0:s0 + n_speech]]
                    else:
                        target += [IGNORE_ID] * (t_len - t0) + speech[s0:] + [self.eos_token]
                        parts += [text_embs[i][t0:], task_id, speech_embs[i][s0:]]
            else:
                target = [IGNORE_ID] * (1 + instruct_lens[i] + t_len) + speech + [self.eos_token]
                parts = [sos, instruct_embs[i], text_embs[i], task_id, speech_embs[i]]
            targets.append(torch.tensor(target, dtype=torch.long))
            inputs.append(torch.cat(parts, dim=0))
        lm_input_len = torch.tensor([x.size(0) for x in inputs], dtype=torch.int32)
        lm_input = pad_sequence(inputs, batch_first=True, padding_value=IGNORE_ID)
        lm_target = pad_sequence(targets, batch_first=True, padding_value=IGNORE_ID)
        return lm_target, lm_input, lm_input_len

    def _instruct_from_batch(self, batch: dict, device: torch.device):
        """v2 never uses instruct tokens in the LM (the v2 front end puts instructions in the text)."""
        return None, None, None

    def logits_and_target(self, batch: dict, device: torch.device,
                          input_speech_token: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, classes) and targets (B, T; IGNORE_ID where none); ``forward`` (TransformerLM's:
        loss and accuracy over these) and ``input_speech_token`` as there; ``embedding`` is unused."""
        text_token = batch["text_token"].to(device)
        text_token_len = batch["text_token_len"].to(device)
        speech_token = batch["speech_token"].to(device)
        speech_token_len = batch["speech_token_len"].to(device)
        instruct_token, instruct_token_emb, instruct_token_len = self._instruct_from_batch(batch, device)

        text_token_emb = self._text_emb(text_token)
        sos_emb, task_id_emb = self._special_emb(self.sos), self._special_emb(self.task_id)
        read = speech_token if input_speech_token is None else input_speech_token.to(device)  # ours: token noise
        speech_token_emb = self.speech_embedding(read)
        lm_target, lm_input, lm_input_len = self.prepare_lm_input_target(
            sos_emb, text_token, text_token_emb, text_token_len, task_id_emb,
            speech_token, speech_token_emb, speech_token_len,
            instruct_token, instruct_token_emb, instruct_token_len,
        )
        lm_output, _ = self.llm(lm_input, lm_input_len.to(device))
        return self.llm_decoder(lm_output), lm_target.to(device)

    # ------------------------------------------------------------------ inference
    def _prefix(self, instruct_token: Optional[torch.Tensor]) -> torch.Tensor:
        """``[sos]`` or ``[sos, instruct]``: the training layout's head (instruct target is ignored)."""
        sos = self._special_emb(self.sos)
        if instruct_token is None or instruct_token.numel() == 0:
            return sos
        return torch.cat([sos, self._text_emb(instruct_token.reshape(1, -1)).to(sos.dtype)], dim=1)

    def _prompt_speech_emb(self, prompt_speech_token: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if prompt_speech_token.numel() != 0:
            return self.speech_embedding(prompt_speech_token.reshape(1, -1))
        return like.new_zeros(1, 0, self.llm_input_size)

    def _step(self, lm_input: torch.Tensor, cache):
        """One incremental LM call; returns float32 log-probs of the last position and the cache."""
        seq_len = lm_input.size(1) + _cache_len(cache)
        masks = torch.tril(torch.ones((1, seq_len, seq_len), device=lm_input.device, dtype=torch.bool))
        y_pred, cache = self.llm.forward_one_step(lm_input, masks=masks, cache=cache)
        # float32 log-softmax: sampling thresholds (top_p) should not see half rounding
        return self.llm_decoder(y_pred[:, -1]).float().log_softmax(dim=-1), cache

    @torch.inference_mode()
    def inference(
        self,
        text: torch.Tensor,
        text_len: torch.Tensor,
        prompt_text: torch.Tensor,
        prompt_text_len: torch.Tensor,
        prompt_speech_token: torch.Tensor,
        prompt_speech_token_len: torch.Tensor,
        embedding: torch.Tensor,
        sampling: int = 25,
        max_token_text_ratio: float = 20,
        min_token_text_ratio: float = 2,
        uuid: str = "",
        instruct_token: Optional[torch.Tensor] = None,
    ) -> Generator[int, None, None]:
        """Yield speech tokens (batch 1): ``[sos, (instruct), prompt_text + text, task_id, prompt_speech]``.

        ``embedding`` is unused (no speaker vector in v2/v3). Between ``min_token_text_ratio`` and
        ``max_token_text_ratio`` tokens per token of ``text`` are generated; before the minimum
        every special class is refused, after it any special class ends generation.
        ``instruct_token`` (ours, optional) is placed right after sos as in training; upstream's
        front end gets the same layout by prepending the instruction to ``prompt_text``.
        """
        full_text = torch.cat([prompt_text, text], dim=1)
        text_emb = self._text_emb(full_text)
        prefix = self._prefix(instruct_token)
        lm_input = torch.cat(
            [prefix, text_emb.to(prefix.dtype), self._special_emb(self.task_id),
             self._prompt_speech_emb(prompt_speech_token, prefix)],
            dim=1,
        )
        # ``text_len`` counts only ``text``; upstream adds and subtracts prompt_text_len (in place)
        min_len = int(int(text_len) * min_token_text_ratio)
        max_len = int(int(text_len) * max_token_text_ratio)

        out_tokens: List[int] = []
        cache = None
        for i in range(max_len):
            logp, cache = self._step(lm_input, cache)
            top_ids = int(self.sampling_ids(logp.squeeze(dim=0), out_tokens, sampling, ignore_eos=i < min_len))
            if top_ids in self.stop_token_ids:
                break
            yield top_ids
            out_tokens.append(top_ids)
            lm_input = self.speech_embedding.weight[top_ids].reshape(1, 1, -1)

    @torch.inference_mode()
    def inference_bistream(
        self,
        text: Iterable[torch.Tensor],
        prompt_text: torch.Tensor,
        prompt_text_len: torch.Tensor,
        prompt_speech_token: torch.Tensor,
        prompt_speech_token_len: torch.Tensor,
        embedding: torch.Tensor,
        sampling: int = 25,
        max_token_text_ratio: float = 20,
        min_token_text_ratio: float = 2,
        instruct_token: Optional[torch.Tensor] = None,
    ) -> Generator[int, None, None]:
        """Yield speech tokens while text token ids arrive in pieces from ``text`` (each (1, n)).

        Upstream's schedule: the prompt speech is interleaved 5 text : 15 speech with the
        (prompt) text; afterwards 5 new text tokens are fed, 15 speech tokens are sampled (eos
        refused; fewer in the first round when prompt speech is left over) and a fill token is
        forced (yielded never, fed never), which asks for the next 5 text tokens. When the text
        ends, the leftover text and task_id are fed and sampling runs until eos.
        Deviations, for safety: the final phase stops after ``max_token_text_ratio`` speech tokens
        per token of ``text`` and refuses eos before ``min_token_text_ratio`` (upstream ignores both
        ratios here), and a special class other than eos ends generation there instead of raising.
        """
        n_text, n_speech = self.mix_ratio
        prefix = self._prefix(instruct_token)
        prefix_len = prefix.size(1)
        task_id_emb = self._special_emb(self.task_id)
        prompt_speech_emb = self._prompt_speech_emb(prompt_speech_token, prefix)
        lm_input = prefix
        # upstream seeds the text cache with the prompt text: prompt speech/text < 15/5 is "basically impossible"
        text_cache = self._text_emb(prompt_text.reshape(1, -1)).to(prefix.dtype)
        n_prompt_speech = prompt_speech_emb.size(1)
        # Upstream's formula: it completes the prompt's last 15-token chunk, but a prompt of an exact
        # multiple of 15 gets a whole extra chunk (15 tokens) before the first fill. Kept as upstream.
        next_fill_index = (n_prompt_speech // n_speech + 1) * n_speech - n_prompt_speech
        out_tokens: List[int] = []  # includes forced fill tokens, as upstream (sampling sees them)
        n_speech_out = 0
        n_new_text = 0
        cache = None
        for piece in text:
            piece = torch.as_tensor(piece, device=prefix.device).reshape(1, -1)
            n_new_text += piece.size(1)
            text_cache = torch.cat([text_cache, self._text_emb(piece).to(prefix.dtype)], dim=1)
            # interleave the remaining prompt speech with text while there is enough text
            while prompt_speech_emb.size(1) != 0 and text_cache.size(1) >= n_text:
                lm_input = torch.cat([lm_input, text_cache[:, :n_text], prompt_speech_emb[:, :n_speech]], dim=1)
                text_cache, prompt_speech_emb = text_cache[:, n_text:], prompt_speech_emb[:, n_speech:]
            if prompt_speech_emb.size(1) != 0:
                continue  # wait for more text
            after_fill = len(out_tokens) != 0 and out_tokens[-1] == self.fill_token
            nothing_fed = len(out_tokens) == 0 and lm_input.size(1) == prefix_len
            if after_fill or nothing_fed:
                if text_cache.size(1) < n_text:
                    continue  # wait for more text
                # after a fill token only the new text is fed (the fill itself never is)
                lm_input = text_cache[:, :n_text] if after_fill else torch.cat([lm_input, text_cache[:, :n_text]], 1)
                text_cache = text_cache[:, n_text:]
            while True:
                logp, cache = self._step(lm_input, cache)
                if next_fill_index != -1 and len(out_tokens) == next_fill_index:
                    top_ids = self.fill_token
                    next_fill_index += n_speech + 1
                else:
                    top_ids = int(self.sampling_ids(logp.squeeze(dim=0), out_tokens, sampling, ignore_eos=True))
                if top_ids == self.fill_token:
                    next_fill_index = len(out_tokens) + n_speech + 1
                out_tokens.append(top_ids)
                if top_ids >= self.speech_token_size:
                    if top_ids == self.fill_token:
                        lm_input = lm_input[:, :0]  # already in the cache; the fill itself is never fed
                        break
                    raise ValueError(f"bistream sampling produced special token {top_ids} while eos was refused")
                yield top_ids
                n_speech_out += 1
                lm_input = self.speech_embedding.weight[top_ids].reshape(1, 1, -1)

        # The text has ended: feed what is left, then decode until eos. Upstream differs here (a bug
        # we do not copy): after a fill token its ``lm_input`` still holds the last speech token, which
        # was already fed, so upstream feeds it twice; training has it once, and so does cosytrain.
        lm_input = torch.cat([lm_input, text_cache, task_id_emb], dim=1)
        min_len = int(n_new_text * min_token_text_ratio)
        max_len = int(n_new_text * max_token_text_ratio)
        while n_speech_out < max_len:
            logp, cache = self._step(lm_input, cache)
            top_ids = int(self.sampling_ids(logp.squeeze(dim=0), out_tokens, sampling,
                                            ignore_eos=n_speech_out < min_len))
            out_tokens.append(top_ids)
            if top_ids >= self.speech_token_size:
                if top_ids != self.eos_token:
                    logger.warning("bistream: special token %d ended generation (upstream raises)", top_ids)
                break
            yield top_ids
            n_speech_out += 1
            lm_input = self.speech_embedding.weight[top_ids].reshape(1, 1, -1)


class CosyVoice3LM(Qwen2LM):
    """CosyVoice 3 LLM: like v2, but the specials are rows of ``speech_embedding``.

    sos = ``speech_token_size``, eos = +1, task_id = +2, fill = +3; there are 200 special
    classes (no ``llm_embedding``) and ``llm_decoder`` has no bias. Training batches may carry
    ``instruct_token``/``instruct_token_len``, embedded with Qwen's ``embed_tokens`` right after sos.
    """

    num_special = 200

    def _set_special_ids(self) -> None:
        self.sos = self.speech_token_size + 0
        self.eos_token = self.speech_token_size + 1
        self.task_id = self.speech_token_size + 2
        self.fill_token = self.speech_token_size + 3

    def _build_special_embedding(self) -> None:
        pass  # the specials live in speech_embedding

    def _build_decoder(self, llm_output_size: int) -> nn.Linear:
        return nn.Linear(llm_output_size, self.num_classes, bias=False)

    def _special_emb(self, index: int) -> torch.Tensor:
        return self.speech_embedding.weight[index].reshape(1, 1, -1)

    def _instruct_from_batch(self, batch: dict, device: torch.device):
        """Upstream requires the instruct keys; a batch without them is treated as no instruction."""
        if "instruct_token" not in batch:
            return None, None, None
        instruct_token = batch["instruct_token"].to(device)
        instruct_token_len = batch["instruct_token_len"].to(device)
        return instruct_token, self._text_emb(instruct_token), instruct_token_len
