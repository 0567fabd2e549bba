"""CosyVoice 1's text-to-speech-token language model.

``TransformerLM`` is CosyVoice 1's LLM: a causal Conformer text encoder plus a causal
Transformer decoder-only LM over ``[sos, speaker, text, task_id, speech]``. Constructor
arguments, submodule names (and so state-dict keys), the loss and the sampling loop follow
upstream ``cosyvoice/llm/llm.py``.
"""

from __future__ import annotations

from typing import Callable, Dict, Generator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence, unpad_sequence

from cosytrain.models.common import IGNORE_ID, th_accuracy
from cosytrain.models.transformer.label_smoothing_loss import LabelSmoothingLoss


class TransformerLM(nn.Module):
    """CosyVoice 1 LLM.

    ``text_encoder`` and ``llm`` are encoder modules (upstream: ConformerEncoder and
    TransformerEncoder, both with ``static_chunk_size=1`` so they are causal); ``sampling``
    is a callable ``(logp, decoded_tokens, sampling) -> token id tensor`` such as
    ``functools.partial(ras_sampling, top_p=0.8, top_k=25, win_size=10, tau_r=0.1)``.
    """

    def __init__(
        self,
        text_encoder_input_size: int,
        llm_input_size: int,
        llm_output_size: int,
        text_token_size: int,
        speech_token_size: int,
        text_encoder: nn.Module,
        llm: nn.Module,
        sampling: Callable,
        length_normalized_loss: bool = True,
        lsm_weight: float = 0.0,
        spk_embed_dim: int = 192,
    ):
        super().__init__()
        self.llm_input_size = llm_input_size
        self.speech_token_size = speech_token_size
        # text side
        self.text_embedding = nn.Embedding(text_token_size, text_encoder_input_size)
        self.text_encoder = text_encoder
        self.text_encoder_affine_layer = nn.Linear(self.text_encoder.output_size(), llm_input_size)
        # speech-token LM; rows 0/1 of llm_embedding are the sos and task-id vectors
        self.sos = 0
        self.task_id = 1
        self.eos_token = self.speech_token_size
        self.llm_embedding = nn.Embedding(2, llm_input_size)
        self.llm = llm
        self.llm_decoder = nn.Linear(llm_output_size, speech_token_size + 1)
        self.criterion_ce = LabelSmoothingLoss(
            size=speech_token_size + 1,
            padding_idx=IGNORE_ID,
            smoothing=lsm_weight,
            normalize_length=length_normalized_loss,
        )
        self.speech_embedding = nn.Embedding(speech_token_size, llm_input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, llm_input_size)
        self.sampling = sampling

    def encode(self, text: torch.Tensor, text_lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Causal text encoding projected to the LM width; returns (B, T, llm_input), lengths."""
        encoder_out, encoder_mask = self.text_encoder(
            text, text_lengths, decoding_chunk_size=1, num_decoding_left_chunks=-1
        )
        encoder_out_lens = encoder_mask.squeeze(1).sum(1)
        return self.text_encoder_affine_layer(encoder_out), encoder_out_lens

    def pad_unpad_sequence(
        self,
        sos_emb: torch.Tensor,
        embedding: torch.Tensor,
        text_token: torch.Tensor,
        text_token_len: torch.Tensor,
        task_id_emb: torch.Tensor,
        speech_token: torch.Tensor,
        speech_token_len: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Build per-sample ``[sos, spk, text, task_id, speech]`` and right-pad with IGNORE_ID.

        Padding with -1.0 (not 0) is upstream's; padded frames are masked in the LM anyway.
        """
        texts = unpad_sequence(text_token, text_token_len.cpu(), batch_first=True)
        speeches = unpad_sequence(speech_token, speech_token_len.cpu(), batch_first=True)
        lm_input = [
            torch.concat(
                [sos_emb.squeeze(dim=0), embedding[i], texts[i], task_id_emb.squeeze(dim=0), speeches[i]], dim=0
            )
            for i in range(len(texts))
        ]
        lm_input_len = torch.tensor([x.size(0) for x in lm_input], dtype=torch.int32)
        return pad_sequence(lm_input, batch_first=True, padding_value=IGNORE_ID), lm_input_len

    def forward(self, batch: dict, device: torch.device,
                input_speech_token: Optional[torch.Tensor] = None) -> Dict[str, Optional[torch.Tensor]]:
        """Teacher-forced loss on a padded batch (upstream batch keys); returns loss and acc.

        ``input_speech_token`` (ours; upstream has no such argument): the speech tokens the LM reads
        when they differ from the targets (``batch["speech_token"]``), e.g. with token noise
        (``cosytrain/tasks/token_noise.py``); same shape. None reads the targets, as upstream.
        """
        logits, lm_target = self.logits_and_target(batch, device, input_speech_token)
        loss = self.criterion_ce(logits, lm_target)  # log-softmax in float32 inside
        # over every class the decoder has (v1: speech_token_size + 1; Qwen2LM, which inherits this: + 3)
        acc = th_accuracy(logits.view(-1, logits.shape[-1]), lm_target, ignore_label=IGNORE_ID)
        return {"loss": loss, "acc": acc}

    def logits_and_target(self, batch: dict, device: torch.device,
                          input_speech_token: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The training layout's logits (B, T, classes) and targets (B, T; IGNORE_ID where none);
        ``input_speech_token`` as in :meth:`forward`."""
        text_token = batch["text_token"].to(device)
        text_token_len = batch["text_token_len"].to(device)
        speech_token = batch["speech_token"].to(device)
        speech_token_len = batch["speech_token_len"].to(device)
        embedding = batch["embedding"].to(device)

        # targets: ignore sos, spk and the text; predict speech tokens then eos
        lm_target = [
            torch.tensor(
                [IGNORE_ID] * (2 + int(text_token_len[i]))
                + speech_token[i, : int(speech_token_len[i])].tolist()
                + [self.speech_token_size]
            )
            for i in range(text_token.size(0))
        ]
        lm_target = pad_sequence(lm_target, batch_first=True, padding_value=IGNORE_ID).to(device)

        text_emb, text_token_len = self.encode(self.text_embedding(text_token), text_token_len)
        embedding = self.spk_embed_affine_layer(F.normalize(embedding, dim=1)).unsqueeze(1)
        sos_emb = self.llm_embedding.weight[self.sos].reshape(1, 1, -1)
        task_id_emb = self.llm_embedding.weight[self.task_id].reshape(1, 1, -1)
        speech_emb = self.speech_embedding(speech_token if input_speech_token is None
                                           else input_speech_token.to(device))

        lm_input, lm_input_len = self.pad_unpad_sequence(
            sos_emb, embedding, text_emb, text_token_len, task_id_emb, speech_emb, speech_token_len
        )
        lm_output, _ = self.llm(lm_input, lm_input_len.to(device))
        return self.llm_decoder(lm_output), lm_target

    def sampling_ids(
        self, weighted_scores: torch.Tensor, decoded_tokens: List[int], sampling: int, ignore_eos: bool = True
    ) -> torch.Tensor:
        """Draw a token; while ``ignore_eos``, redraw (up to 100 times, as upstream) until it is not eos.

        Upstream raises after the 100th eos. That is certain for a deterministic sampler whose pick is
        eos (greedy, or top-k 1) and likely when the model is sure it is done: the utterance is lost.
        Here the draw after the last redraw is taken with every id from ``speech_token_size`` up
        (eos and the other special tokens) masked out: the most likely speech token for greedy, the
        renormalised distribution for a random sampler. Every draw upstream would accept is the same
        (same seed, same tokens); only the utterances upstream drops differ.
        """
        num_trials, max_trials = 0, 100
        while True:
            top_ids = self.sampling(weighted_scores, decoded_tokens, sampling)
            if (not ignore_eos) or (top_ids < self.speech_token_size):
                return top_ids
            num_trials += 1
            if num_trials > max_trials:
                speech_only = weighted_scores.clone()
                speech_only[self.speech_token_size:] = float("-inf")
                return self.sampling(speech_only, decoded_tokens, sampling)

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
    ) -> Generator[int, None, None]:
        """Yield speech tokens one at a time (batch 1), as upstream.

        Between ``min_token_text_ratio`` and ``max_token_text_ratio`` tokens per text token
        (of ``text``, not the prompt) are generated; eos is refused before the minimum and
        ends generation after it. The LM runs incrementally with key/value caches.
        """
        device = text.device
        text = torch.concat([prompt_text, text], dim=1)
        # Not in place: upstream's ``text_len += prompt_text_len`` also edits the caller's tensor.
        text_len = text_len + prompt_text_len
        text, text_len = self.encode(self.text_embedding(text), text_len)

        if embedding.shape[0] != 0:
            embedding = self.spk_embed_affine_layer(F.normalize(embedding, dim=1)).unsqueeze(dim=1)
        else:
            embedding = torch.zeros(1, 0, self.llm_input_size, dtype=text.dtype, device=device)

        sos_emb = self.llm_embedding.weight[self.sos].reshape(1, 1, -1)
        task_id_emb = self.llm_embedding.weight[self.task_id].reshape(1, 1, -1)
        if prompt_speech_token_len != 0:
            prompt_speech_token_emb = self.speech_embedding(prompt_speech_token)
        else:
            prompt_speech_token_emb = torch.zeros(1, 0, self.llm_input_size, dtype=text.dtype, device=device)
        lm_input = torch.concat([sos_emb, embedding, text, task_id_emb, prompt_speech_token_emb], dim=1)

        min_len = int((text_len - prompt_text_len) * min_token_text_ratio)
        max_len = int((text_len - prompt_text_len) * max_token_text_ratio)

        out_tokens: List[int] = []
        offset = 0
        att_cache = torch.zeros((0, 0, 0, 0), device=device)
        cnn_cache = torch.zeros((0, 0, 0, 0), device=device)
        for i in range(max_len):
            steps = lm_input.shape[1]
            causal = torch.tril(torch.ones((1, steps, steps), device=device)).to(torch.bool)
            y_pred, att_cache, cnn_cache = self.llm.forward_chunk(
                lm_input, offset=offset, required_cache_size=-1,
                att_cache=att_cache, cnn_cache=cnn_cache, att_mask=causal,
            )
            # float32 log-softmax: sampling thresholds (top_p) should not see half rounding
            logp = self.llm_decoder(y_pred[:, -1]).float().log_softmax(dim=-1)
            top_ids = self.sampling_ids(logp.squeeze(dim=0), out_tokens, sampling, ignore_eos=i < min_len)
            if top_ids == self.eos_token:
                break
            token = int(top_ids)
            yield token
            out_tokens.append(token)
            offset += lm_input.size(1)
            lm_input = self.speech_embedding.weight[token].reshape(1, 1, -1)
