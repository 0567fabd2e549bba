"""CosyVoice 1 flow stage: speech tokens + speaker x-vector -> mel (upstream ``cosyvoice.flow.flow``).

Tokens are embedded, encoded by a Conformer, projected to 80 channels, resampled to the mel rate by
the length regulator and decoded by conditional flow matching, conditioned on the prompt mel and the
speaker embedding.
"""

from __future__ import annotations

import random
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from cosytrain.errors import ConfigurationError
from cosytrain.models.transformer.mask import make_pad_mask

_DEFAULT_CFM_PARAMS = {'sigma_min': 1e-06, 'solver': 'euler', 't_scheduler': 'cosine',
                       'training_cfg_rate': 0.2, 'inference_cfg_rate': 0.7, 'reg_loss_type': 'l1'}
_DEFAULT_DECODER_CONF = {'in_channels': 240, 'out_channel': 80, 'spk_emb_dim': 80, 'n_spks': 1,
                         'cfm_params': _DEFAULT_CFM_PARAMS,
                         'decoder_params': {'channels': [256, 256], 'dropout': 0.0, 'attention_head_dim': 64,
                                            'n_blocks': 4, 'num_mid_blocks': 12, 'num_heads': 8, 'act_fn': 'gelu'}}
_DEFAULT_MEL_FEAT_CONF = {'n_fft': 1024, 'num_mels': 80, 'sampling_rate': 22050, 'hop_size': 256,
                          'win_size': 1024, 'fmin': 0, 'fmax': 8000}

# Upstream v1 inference hard-codes the 22.05 kHz / hop 256 mel rate whatever mel_feat_conf says.
V1_SAMPLE_RATE = 22050
V1_HOP = 256


def random_prompt_conds(feat: torch.Tensor, feat_len: torch.Tensor) -> torch.Tensor:
    """Training prompt condition (B, T, C): per sample, with prob. 0.5 a prefix of up to 30% of the mel.

    Uses python ``random`` in upstream's order (``random()`` per sample, then ``randint`` when kept),
    so seeded runs reproduce upstream's batches.
    """
    conds = torch.zeros(feat.shape, device=feat.device, dtype=torch.float32)
    for i, j in enumerate(feat_len.tolist()):
        if random.random() < 0.5:
            continue
        index = random.randint(0, int(0.3 * j))
        conds[i, :index] = feat[i, :index]
    return conds


def _batch_tensor(batch: Mapping[str, Any], key: str, device: torch.device) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"flow batch is missing {key!r}; batches need speech_token(_len), speech_feat(_len), embedding")
    return batch[key].to(device)


class MaskedDiffWithXvec(nn.Module):
    """v1 flow. ``encoder``, ``length_regulator`` and ``decoder`` are built modules (as from the yaml).

    ``mel_feat_conf`` is cosytrain's (older upstream versions had it; ace7c47 does not): written
    upstream configs leave it out (:data:`COSYTRAIN_ONLY_ARGS`), and upstream's v1 inference
    hard-codes the 22.05 kHz / hop 256 mel rate anyway.
    """

    COSYTRAIN_ONLY_ARGS = ("mel_feat_conf",)

    def __init__(
        self,
        input_size: int = 512,
        output_size: int = 80,
        spk_embed_dim: int = 192,
        output_type: str = "mel",
        vocab_size: int = 4096,
        input_frame_rate: int = 50,
        only_mask_loss: bool = True,
        encoder: Optional[nn.Module] = None,
        length_regulator: Optional[nn.Module] = None,
        decoder: Optional[nn.Module] = None,
        decoder_conf: Optional[Dict[str, Any]] = None,
        mel_feat_conf: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        if encoder is None or length_regulator is None or decoder is None:
            raise ConfigurationError("MaskedDiffWithXvec needs encoder, length_regulator and decoder modules "
                                     "(build them from the flow section of the config)")
        self.input_size = input_size
        self.output_size = output_size
        self.decoder_conf = decoder_conf if decoder_conf is not None else _DEFAULT_DECODER_CONF
        self.mel_feat_conf = mel_feat_conf if mel_feat_conf is not None else _DEFAULT_MEL_FEAT_CONF
        self.vocab_size = vocab_size
        self.output_type = output_type
        self.input_frame_rate = input_frame_rate
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(self.encoder.output_size(), output_size)
        self.decoder = decoder
        self.length_regulator = length_regulator
        self.only_mask_loss = only_mask_loss

    def embed_speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    def embed_tokens(self, token: torch.Tensor, token_len: torch.Tensor) -> torch.Tensor:
        """Embedding of the (clamped) tokens with padded positions zeroed."""
        mask = (~make_pad_mask(token_len, token.shape[1])).unsqueeze(-1)
        emb = self.input_embedding(torch.clamp(token, min=0).long())
        return emb * mask.to(emb.dtype)

    def forward(self, batch: Mapping[str, Any], device: torch.device) -> Dict[str, torch.Tensor]:
        """Training loss for a batch with upstream's keys (python/torch RNG in upstream's order)."""
        token = _batch_tensor(batch, "speech_token", device)
        token_len = _batch_tensor(batch, "speech_token_len", device)
        feat = _batch_tensor(batch, "speech_feat", device)
        feat_len = _batch_tensor(batch, "speech_feat_len", device)
        embedding = _batch_tensor(batch, "embedding", device)

        embedding = self.embed_speaker(embedding)
        h, _ = self.encoder(self.embed_tokens(token, token_len), token_len)
        h = self.encoder_proj(h)
        h, _ = self.length_regulator(h, feat_len)

        conds = random_prompt_conds(feat, feat_len).transpose(1, 2)
        mask = (~make_pad_mask(feat_len)).to(h)
        loss, _ = self.decoder.compute_loss(
            feat.transpose(1, 2).contiguous(),
            mask.unsqueeze(1),
            h.transpose(1, 2).contiguous(),
            embedding,
            cond=conds,
        )
        return {"loss": loss}

    @torch.inference_mode()
    def inference(self, token: torch.Tensor, token_len: torch.Tensor, prompt_token: torch.Tensor,
                  prompt_token_len: torch.Tensor, prompt_feat: torch.Tensor, prompt_feat_len: torch.Tensor,
                  embedding: torch.Tensor, flow_cache: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mel (1, 80, T) for ``token`` after the prompt, plus the updated ``flow_cache``.

        The target length is ``int(n_tokens / input_frame_rate * 22050 / 256)`` as upstream.
        """
        if token.shape[0] != 1:
            raise ValueError(f"flow inference takes one utterance at a time, got batch {token.shape[0]}")
        embedding = self.embed_speaker(embedding)

        token_len1, token_len2 = prompt_token.shape[1], token.shape[1]
        token, token_len = torch.cat([prompt_token, token], dim=1), prompt_token_len + token_len
        h, _ = self.encoder(self.embed_tokens(token, token_len), token_len)
        h = self.encoder_proj(h)
        mel_len1 = prompt_feat.shape[1]
        mel_len2 = int(token_len2 / self.input_frame_rate * V1_SAMPLE_RATE / V1_HOP)
        h, _ = self.length_regulator.inference(h[:, :token_len1], h[:, token_len1:], mel_len1, mel_len2,
                                               self.input_frame_rate)

        conds = torch.zeros([1, mel_len1 + mel_len2, self.output_size], device=token.device, dtype=h.dtype)
        conds[:, :mel_len1] = prompt_feat
        conds = conds.transpose(1, 2)
        mask = torch.ones(1, 1, mel_len1 + mel_len2, device=token.device, dtype=h.dtype)
        feat, flow_cache = self.decoder(
            mu=h.transpose(1, 2).contiguous(),
            mask=mask,
            spks=embedding,
            cond=conds,
            n_timesteps=10,
            prompt_len=mel_len1,
            cache=flow_cache,
        )
        feat = feat[:, :, mel_len1:]
        if feat.shape[2] != mel_len2:
            raise RuntimeError(f"flow produced {feat.shape[2]} frames, expected {mel_len2}")
        return feat.float(), flow_cache


# ------------------------------------------------------------------------------------------------
# CosyVoice 2 / 3
# ------------------------------------------------------------------------------------------------


def _check_feat_matches(feat: torch.Tensor, frames: int, what: str) -> None:
    if feat.shape[1] != frames:
        raise ValueError(f"speech_feat has {feat.shape[1]} frames but the {what} gives {frames} "
                         "(token_mel_ratio x speech tokens); trim feats to token_mel_ratio * tokens in the data")


class _CausalFlowBase(nn.Module):
    """What the v2 and v3 flows share: x-vector projection, token embedding, prompt conditions,
    and the unified streaming/offline training coin (the first python ``random`` draw)."""

    def _init_common(self, input_size: int, output_size: int, spk_embed_dim: int, output_type: str,
                     vocab_size: int, input_frame_rate: int, only_mask_loss: bool, token_mel_ratio: int,
                     pre_lookahead_len: int, decoder_conf: Optional[Dict[str, Any]]) -> None:
        """Attributes and the two modules every causal flow has (token table, speaker projection),
        registered first so the state dict keeps upstream's key order."""
        self.input_size = input_size
        self.output_size = output_size
        self.decoder_conf = decoder_conf if decoder_conf is not None else _DEFAULT_DECODER_CONF
        self.vocab_size = vocab_size
        self.output_type = output_type
        self.input_frame_rate = input_frame_rate
        self.only_mask_loss = only_mask_loss
        self.token_mel_ratio = token_mel_ratio
        self.pre_lookahead_len = pre_lookahead_len
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)

    input_embedding: nn.Embedding
    spk_embed_affine_layer: nn.Linear
    decoder: nn.Module
    output_size: int
    pre_lookahead_len: int

    def embed_speaker(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    def embed_tokens(self, token: torch.Tensor, token_len: torch.Tensor) -> torch.Tensor:
        mask = (~make_pad_mask(token_len, token.shape[1])).unsqueeze(-1)
        emb = self.input_embedding(torch.clamp(token, min=0).long())
        return emb * mask.to(emb.dtype)

    def encode(self, token: torch.Tensor, token_len: torch.Tensor, streaming: bool,
               context: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Embedded tokens (B, T, D) -> mu (B, T_mel, 80) and its (B, T_mel) float valid mask."""
        raise NotImplementedError

    def forward(self, batch: Mapping[str, Any], device: torch.device) -> Dict[str, torch.Tensor]:
        """Training loss; python/torch RNG consumed in upstream's order (streaming coin first)."""
        token = _batch_tensor(batch, "speech_token", device)
        token_len = _batch_tensor(batch, "speech_token_len", device)
        feat = _batch_tensor(batch, "speech_feat", device)
        feat_len = _batch_tensor(batch, "speech_feat_len", device)
        embedding = _batch_tensor(batch, "embedding", device)

        # upstream "unified training": half of the batches see chunk masks, half full context
        streaming = random.random() < 0.5
        embedding = self.embed_speaker(embedding)
        h, mask = self.encode(self.embed_tokens(token, token_len), token_len, streaming)
        _check_feat_matches(feat, h.shape[1], "encoder output")
        conds = random_prompt_conds(feat, feat_len).transpose(1, 2)
        loss, _ = self.decoder.compute_loss(
            feat.transpose(1, 2).contiguous(),
            mask.to(h.dtype).unsqueeze(1),
            h.transpose(1, 2).contiguous(),
            embedding,
            cond=conds,
            streaming=streaming,
        )
        return {"loss": loss}

    @torch.inference_mode()
    def inference(self, token: torch.Tensor, token_len: torch.Tensor, prompt_token: torch.Tensor,
                  prompt_token_len: torch.Tensor, prompt_feat: torch.Tensor, prompt_feat_len: torch.Tensor,
                  embedding: torch.Tensor, streaming: bool = False, finalize: bool = True,
                  n_timesteps: int = 10) -> Tuple[torch.Tensor, None]:
        """Mel (1, 80, T) for ``token`` after the prompt; the second value is None (no cache), as upstream.

        ``finalize=False`` (a streaming chunk that is not the last) holds back the last
        ``pre_lookahead_len`` tokens as look-ahead context, so it returns
        ``token_mel_ratio * (n_tokens - pre_lookahead_len)`` frames. ``prompt_feat`` must have
        ``token_mel_ratio`` frames per prompt token.
        """
        if token.shape[0] != 1:
            raise ValueError(f"flow inference takes one utterance at a time, got batch {token.shape[0]}")
        embedding = self.embed_speaker(embedding)
        token, token_len = torch.cat([prompt_token, token], dim=1), prompt_token_len + token_len
        emb = self.embed_tokens(token, token_len)
        if finalize:
            h, _ = self.encode(emb, token_len, streaming)
        else:
            n = self.pre_lookahead_len
            if emb.shape[1] <= n:
                raise ValueError(f"a non-final chunk needs more than pre_lookahead_len={n} tokens")
            h, _ = self.encode(emb[:, :-n], token_len, streaming, context=emb[:, -n:])
        mel_len1 = prompt_feat.shape[1]
        mel_len2 = h.shape[1] - mel_len1
        if mel_len2 <= 0:
            raise ValueError(f"prompt_feat has {mel_len1} frames but prompt + tokens give only {h.shape[1]}")

        conds = torch.zeros([1, mel_len1 + mel_len2, self.output_size], device=token.device, dtype=h.dtype)
        conds[:, :mel_len1] = prompt_feat
        mask = torch.ones(1, 1, mel_len1 + mel_len2, device=token.device, dtype=h.dtype)
        feat, _ = self.decoder(
            mu=h.transpose(1, 2).contiguous(),
            mask=mask,
            spks=embedding,
            cond=conds.transpose(1, 2),
            n_timesteps=n_timesteps,
            streaming=streaming,
        )
        feat = feat[:, :, mel_len1:]
        if feat.shape[2] != mel_len2:
            raise RuntimeError(f"flow produced {feat.shape[2]} frames, expected {mel_len2}")
        return feat.float(), None


class CausalMaskedDiffWithXvec(_CausalFlowBase):
    """v2 flow: ``UpsampleConformerEncoder`` (tokens -> 2x rate), ``encoder_proj``, causal CFM decoder."""

    def __init__(
        self,
        input_size: int = 512,
        output_size: int = 80,
        spk_embed_dim: int = 192,
        output_type: str = "mel",
        vocab_size: int = 4096,
        input_frame_rate: int = 50,
        only_mask_loss: bool = True,
        token_mel_ratio: int = 2,
        pre_lookahead_len: int = 3,
        encoder: Optional[nn.Module] = None,
        decoder: Optional[nn.Module] = None,
        decoder_conf: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        if encoder is None or decoder is None:
            raise ConfigurationError("CausalMaskedDiffWithXvec needs encoder and decoder modules "
                                     "(build them from the flow section of the config)")
        self._init_common(input_size, output_size, spk_embed_dim, output_type, vocab_size, input_frame_rate,
                          only_mask_loss, token_mel_ratio, pre_lookahead_len, decoder_conf)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(self.encoder.output_size(), output_size)
        self.decoder = decoder

    def encode(self, token: torch.Tensor, token_len: torch.Tensor, streaming: bool,
               context: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        h, h_mask = self.encoder(token, token_len, context=context, streaming=streaming)
        # the loss mask is the encoder's own output mask (upstream: h_lengths.sum(-1))
        return self.encoder_proj(h), h_mask.squeeze(1)


class CausalMaskedDiffWithDiT(_CausalFlowBase):
    """v3 flow: no encoder; ``PreLookaheadLayer`` on the token embeddings, repeated ``token_mel_ratio``
    times, conditions a DiT estimator."""

    def __init__(
        self,
        input_size: int = 512,
        output_size: int = 80,
        spk_embed_dim: int = 192,
        output_type: str = "mel",
        vocab_size: int = 4096,
        input_frame_rate: int = 50,
        only_mask_loss: bool = True,
        token_mel_ratio: int = 2,
        pre_lookahead_len: int = 3,
        pre_lookahead_layer: Optional[nn.Module] = None,
        decoder: Optional[nn.Module] = None,
        decoder_conf: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        if pre_lookahead_layer is None or decoder is None:
            raise ConfigurationError("CausalMaskedDiffWithDiT needs pre_lookahead_layer and decoder modules "
                                     "(build them from the flow section of the config)")
        self._init_common(input_size, output_size, spk_embed_dim, output_type, vocab_size, input_frame_rate,
                          only_mask_loss, token_mel_ratio, pre_lookahead_len, decoder_conf)
        self.pre_lookahead_layer = pre_lookahead_layer
        self.decoder = decoder

    def encode(self, token: torch.Tensor, token_len: torch.Tensor, streaming: bool,
               context: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        # no chunk masks here: the look-ahead conv is causal apart from its fixed right context
        h = self.pre_lookahead_layer(token, context=context)
        mask = (~make_pad_mask(token_len, token.shape[1])).to(h.dtype)
        return (h.repeat_interleave(self.token_mel_ratio, dim=1),
                mask.repeat_interleave(self.token_mel_ratio, dim=1))
