"""Token-level CosyVoice 1 inference: text tokens -> speech tokens -> mel -> waveform.

Mirrors upstream ``cosyvoice/cli/model.py`` ``CosyVoiceModel`` (method names, arguments, chunk
sizes, caches and cross-fades), so a front end written against upstream's class works with this
one. The text front end (``inference_sft``, ``inference_zero_shot``, ...) is not here.

Streaming (``tts(stream=True)``) cuts the speech tokens into chunks of ``token_hop_len + 20``
tokens that advance by ``token_hop_len`` (100 at 50 Hz; times ``stream_scale_factor`` per chunk, at
most 200). Three caches hide the seams:

* the flow cache: the initial noise and encoder output of the prompt and of the last 34 mel frames
  of the previous chunk are reused, so the overlapping 20 tokens are denoised from the same start;
* a mel overlap: the last 34 frames of each chunk are held back and cross-faded (Hamming window)
  into the start of the next chunk;
* a hift cache: the last 20 mel frames and their excitation source are prepended to the next chunk,
  and the waveform's last 20 * 256 samples are cross-faded with the next chunk's start, so the
  vocoder's sine phase continues across the seam.

Deviations from upstream, on purpose:

* The LLM runs in the caller's thread, one token at a time, interleaved with the chunk synthesis,
  instead of a background thread polled every 0.1 s. Chunk boundaries depend only on token counts,
  so the chunks are the same; the torch RNG draws happen in a fixed order, so a seeded run is
  reproducible (upstream's two threads share the RNG).
* ``fp16=True`` means FP16 autocast around the LLM and the flow (as upstream), with the vocoder in
  FP32. On a CPU, FP16 autocast is slower than FP32 and not what anyone serving on a CPU wants, so
  there it warns once and runs FP32; ``force_fp16=True`` runs CPU FP16 autocast anyway (tests,
  numerics checks).
* Sessions with no speech tokens raise ``ValueError`` instead of failing inside the flow.

CosyVoice 2/3 (:class:`CosyVoice2Model`, :class:`CosyVoice3Model`) subclass this: the sizes are
attributes set in ``_init_stream_params`` and the per-chunk work is in ``token2wav``.

Why one module over 450 lines: it mirrors upstream's ``cosyvoice/cli/model.py`` class for class, so
the streaming caches and cross-fades can be checked against upstream's file side by side; the v2/v3
classes override v1's hooks and read best next to them.
"""

from __future__ import annotations

import math
import threading
import uuid as uuid_lib
import warnings
from collections.abc import Callable, Generator, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CosyVoiceModel", "CosyVoice2Model", "CosyVoice3Model", "fade_in_out", "resolve_fp16"]

_warned_cpu_fp16 = False


def fade_in_out(fade_in: torch.Tensor, fade_out: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Cross-fade the start of ``fade_in`` with the end of ``fade_out`` over ``len(window) / 2`` samples.

    ``window`` is a symmetric window of even length: its rising half weights the new chunk, its
    falling half the held-back tail. Computed in float64 and cast back, as upstream's numpy window
    promotes the product. Returns a new tensor; the inputs are not modified.
    """
    n = int(window.shape[0] // 2)
    out = fade_in.clone()
    w = window.to(device=fade_in.device, dtype=torch.float64)
    mixed = fade_in[..., :n].double() * w[:n] + fade_out[..., -n:].to(fade_in.device).double() * w[n:]
    out[..., :n] = mixed.to(out.dtype)
    return out


def resolve_fp16(fp16: bool, device: torch.device, force_fp16: bool = False) -> torch.dtype | None:
    """The autocast dtype to use (None = FP32); see the module docstring for the CPU policy."""
    global _warned_cpu_fp16
    if not fp16:
        return None
    if device.type == "cpu" and not force_fp16:
        if not _warned_cpu_fp16:
            warnings.warn("fp16=True on a CPU: FP16 autocast is slow there, running FP32 instead "
                          "(pass force_fp16=True to use CPU FP16 anyway)", RuntimeWarning, stacklevel=3)
            _warned_cpu_fp16 = True
        return None
    return torch.float16


def _hamming(n: int) -> torch.Tensor:
    return torch.from_numpy(np.hamming(n))  # float64, symmetric, as upstream


class CosyVoiceModel:
    """CosyVoice 1 token-level synthesis around already-built ``llm``, ``flow`` and ``hift`` modules.

    The modules are moved to ``device`` (default: CUDA when available, as upstream) and put in
    eval mode. Build them from a model directory with :meth:`from_model_dir`.
    """

    generation = "v1"

    def __init__(self, llm: nn.Module, flow: nn.Module, hift: nn.Module, fp16: bool = False, *,
                 device: str | torch.device | None = None, force_fp16: bool = False) -> None:
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.llm = llm.to(self.device).eval()
        self.flow = flow.to(self.device).eval()
        self.hift = hift.to(self.device).eval()
        self.fp16 = fp16
        self.amp_dtype = resolve_fp16(fp16, self.device, force_fp16)
        self._init_stream_params()
        self.llm_context: ContextManager[Any] = nullcontext()
        self.lock = threading.Lock()
        # per-session state, keyed by a uuid as upstream (several sessions may run at once)
        self.tts_speech_token_dict: dict[str, list[int]] = {}
        self.llm_end_dict: dict[str, bool] = {}
        self.mel_overlap_dict: dict[str, torch.Tensor] = {}
        self.flow_cache_dict: dict[str, torch.Tensor] = {}
        self.hift_cache_dict: dict[str, dict[str, torch.Tensor] | None] = {}

    # ------------------------------------------------------------------ construction
    def _init_stream_params(self) -> None:
        """Upstream's v1 constants; 22050 / 256 is the v1 mel rate (the vocoder's own hop is used)."""
        rate = int(self.flow.input_frame_rate)
        self.mel_hop = int(getattr(self.hift, "upsample_scale", 256))
        self.token_min_hop_len = 2 * rate
        self.token_max_hop_len = 4 * rate
        self.token_overlap_len = 20
        self.mel_overlap_len = int(self.token_overlap_len / rate * self.sample_rate / self.mel_hop)
        self.mel_window = _hamming(2 * self.mel_overlap_len)
        self.mel_cache_len = 20
        self.source_cache_len = int(self.mel_cache_len * self.mel_hop)
        self.speech_window = _hamming(2 * self.source_cache_len)
        self.stream_scale_factor = 1
        if self.stream_scale_factor < 1:
            raise ValueError("stream_scale_factor must be >= 1")

    @property
    def sample_rate(self) -> int:
        return int(getattr(self.hift, "sampling_rate", 22050))

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, fp16: bool = False, *, device: str | torch.device | None = None,
                       force_fp16: bool = False) -> "CosyVoiceModel":
        """Load an upstream-layout model directory (safely and strictly, see :mod:`cosytrain.modeldir`)."""
        from cosytrain.modeldir import GENERATION_NAMES, ModelDirError, load_model_dir

        directory, parts = load_model_dir(model_dir)
        if directory.generation != cls.generation:
            raise ModelDirError(f"{directory.config_path}: a {GENERATION_NAMES[directory.generation]} model directory;"
                                f" {cls.__name__} runs {GENERATION_NAMES[cls.generation]} model directories")
        return cls(parts["llm"], parts["flow"], parts["hift"], fp16, device=device, force_fp16=force_fp16)

    def load(self, llm_model: str | Path, flow_model: str | Path, hift_model: str | Path) -> None:
        """Load three weight files strictly (``weights_only``; hift ``generator.`` prefix stripped; a file
        that does not fit its part is one :class:`~cosytrain.modeldir.StateDictMismatchError` line)."""
        from cosytrain.modeldir import clean_part_state_dict, load_part_state_dict, load_weights_file

        for part, path in (("llm", llm_model), ("flow", flow_model), ("hift", hift_model)):
            module = getattr(self, part)
            state = clean_part_state_dict(part, load_weights_file(path), str(path))
            load_part_state_dict(part, module, state, str(path), generation=self.generation,
                                 model_what=f"this {type(self).__name__}'s {part}")
            module.to(self.device).eval()

    def autocast(self) -> ContextManager[Any]:
        """FP16 autocast when asked for and effective on this device, else a no-op."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ speech tokens
    def speech_tokens(self, text: torch.Tensor, prompt_text: torch.Tensor, llm_prompt_speech_token: torch.Tensor,
                      llm_embedding: torch.Tensor) -> Iterator[int]:
        """Speech tokens from the LLM, one at a time; each step runs under this model's autocast.

        The autocast context is entered per step, never held across a ``yield``, so the caller's
        code (e.g. the vocoder) does not run under it.
        """
        gen = self.llm.inference(
            text=text.to(self.device),
            text_len=torch.tensor([text.shape[1]], dtype=torch.int32, device=self.device),
            prompt_text=prompt_text.to(self.device),
            prompt_text_len=torch.tensor([prompt_text.shape[1]], dtype=torch.int32, device=self.device),
            prompt_speech_token=llm_prompt_speech_token.to(self.device),
            prompt_speech_token_len=torch.tensor([llm_prompt_speech_token.shape[1]], dtype=torch.int32,
                                                 device=self.device),
            embedding=llm_embedding.to(self.device),
        )
        while True:
            with self.llm_context, self.autocast():
                token = next(gen, None)
            if token is None:
                return
            yield int(token)

    def llm_job(self, text: torch.Tensor, prompt_text: torch.Tensor, llm_prompt_speech_token: torch.Tensor,
                llm_embedding: torch.Tensor, uuid: str) -> None:
        """Run the LLM to the end for session ``uuid`` (upstream's thread target)."""
        for token in self.speech_tokens(text, prompt_text, llm_prompt_speech_token, llm_embedding):
            self.tts_speech_token_dict[uuid].append(token)
        self.llm_end_dict[uuid] = True

    def vc_job(self, source_speech_token: torch.Tensor, uuid: str) -> None:
        """Voice conversion: the speech tokens are given, no LLM."""
        self.tts_speech_token_dict[uuid] = source_speech_token.flatten().tolist()
        self.llm_end_dict[uuid] = True

    # ------------------------------------------------------------------ tokens -> waveform
    def token2wav(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                  embedding: torch.Tensor, uuid: str, finalize: bool = False, speed: float = 1.0) -> torch.Tensor:
        """One chunk of speech tokens (1, T) -> waveform (1, L), updating the session's caches.

        ``finalize=False`` keeps the last ``mel_overlap_len`` mel frames and ``source_cache_len``
        samples back for the next chunk; ``finalize=True`` flushes everything.
        """
        device = self.device
        with self.autocast():
            tts_mel, self.flow_cache_dict[uuid] = self.flow.inference(
                token=token.to(device),
                token_len=torch.tensor([token.shape[1]], dtype=torch.int32, device=device),
                prompt_token=prompt_token.to(device),
                prompt_token_len=torch.tensor([prompt_token.shape[1]], dtype=torch.int32, device=device),
                prompt_feat=prompt_feat.to(device),
                prompt_feat_len=torch.tensor([prompt_feat.shape[1]], dtype=torch.int32, device=device),
                embedding=embedding.to(device),
                flow_cache=self.flow_cache_dict[uuid],
            )
        tts_mel = tts_mel.float()

        if self.mel_overlap_dict[uuid].shape[2] != 0:
            tts_mel = fade_in_out(tts_mel, self.mel_overlap_dict[uuid], self.mel_window)
        return self._vocode(tts_mel, uuid, finalize, speed, hold_back_mel=self.mel_overlap_len)

    def _vocode(self, tts_mel: torch.Tensor, uuid: str, finalize: bool, speed: float,
                hold_back_mel: int = 0) -> torch.Tensor:
        """Mel (1, 80, T) -> speech, continuing the session's vocoder cache (upstream's scheme).

        The cached mel tail and NSF source of the previous chunk are prepended, and the first samples
        cross-faded with its held-back speech. ``finalize=False`` keeps the last ``source_cache_len``
        samples (and, for v1, ``hold_back_mel`` mel frames for the flow's overlap fade) for the next chunk.
        """
        hift_cache = self.hift_cache_dict[uuid]
        if hift_cache is not None:
            tts_mel = torch.concat([hift_cache["mel"], tts_mel], dim=2)
            cache_source = hift_cache["source"]
        else:
            cache_source = torch.zeros(1, 1, 0, device=self.device)
        if not finalize:
            if hold_back_mel:
                self.mel_overlap_dict[uuid] = tts_mel[:, :, -hold_back_mel:]
                tts_mel = tts_mel[:, :, :-hold_back_mel]
            tts_speech, tts_source = self.hift.inference(speech_feat=tts_mel, cache_source=cache_source)
            if hift_cache is not None:
                tts_speech = fade_in_out(tts_speech, hift_cache["speech"], self.speech_window)
            self.hift_cache_dict[uuid] = {
                "mel": tts_mel[:, :, -self.mel_cache_len:],
                "source": tts_source[:, :, -self.source_cache_len:],
                "speech": tts_speech[:, -self.source_cache_len:],
            }
            return tts_speech[:, :-self.source_cache_len]
        if speed != 1.0:
            if hift_cache is not None:
                raise ValueError("speed != 1.0 is only supported without streaming")
            tts_mel = F.interpolate(tts_mel, size=int(tts_mel.shape[2] / speed), mode="linear")
        tts_speech, _ = self.hift.inference(speech_feat=tts_mel, cache_source=cache_source)
        if hift_cache is not None:
            tts_speech = fade_in_out(tts_speech, hift_cache["speech"], self.speech_window)
        return tts_speech

    # ------------------------------------------------------------------ sessions
    def _token_feed(self, session: str, text: Any, prompt_text: torch.Tensor, llm_prompt_speech_token: torch.Tensor,
                    llm_embedding: torch.Tensor, source_speech_token: torch.Tensor
                    ) -> tuple[list[int], Callable[[], bool]]:
        """The session's token list and ``pull()``, which appends the LLM's next token (False once done).

        With ``source_speech_token`` (voice conversion) the tokens are given and the LLM never runs.
        """
        source: Iterator[int] | None = None
        if source_speech_token.shape[1] == 0:
            source = self.speech_tokens(text, prompt_text, llm_prompt_speech_token, llm_embedding)
        else:
            self.vc_job(source_speech_token, session)
        tokens = self.tts_speech_token_dict[session]

        def pull() -> bool:
            if source is None:
                return False
            token = next(source, None)
            if token is None:
                self.llm_end_dict[session] = True
                return False
            tokens.append(token)
            return True

        return tokens, pull

    def _open_session(self) -> str:
        session = str(uuid_lib.uuid1())
        with self.lock:
            self.tts_speech_token_dict[session], self.llm_end_dict[session] = [], False
            self.hift_cache_dict[session] = None
            self.mel_overlap_dict[session] = torch.zeros(1, 80, 0, device=self.device)
            self.flow_cache_dict[session] = torch.zeros(1, 80, 0, 2, device=self.device)
        return session

    def _close_session(self, session: str) -> None:
        with self.lock:
            for table in (self.tts_speech_token_dict, self.llm_end_dict, self.mel_overlap_dict,
                          self.hift_cache_dict, self.flow_cache_dict):
                table.pop(session, None)

    def tts(self, text: torch.Tensor = torch.zeros(1, 0, dtype=torch.int32),
            flow_embedding: torch.Tensor = torch.zeros(0, 192),
            llm_embedding: torch.Tensor = torch.zeros(0, 192),
            prompt_text: torch.Tensor = torch.zeros(1, 0, dtype=torch.int32),
            llm_prompt_speech_token: torch.Tensor = torch.zeros(1, 0, dtype=torch.int32),
            flow_prompt_speech_token: torch.Tensor = torch.zeros(1, 0, dtype=torch.int32),
            prompt_speech_feat: torch.Tensor = torch.zeros(1, 0, 80),
            source_speech_token: torch.Tensor = torch.zeros(1, 0, dtype=torch.int32),
            stream: bool = False, speed: float = 1.0, **kwargs: Any) -> Generator[dict[str, torch.Tensor], None, None]:
        """Yield ``{'tts_speech': (1, L) float CPU tensor}``: one item, or one per chunk with ``stream``.

        With ``source_speech_token`` given the LLM is skipped (voice conversion), as upstream.
        """
        session = self._open_session()
        try:
            tokens, pull = self._token_feed(session, text, prompt_text, llm_prompt_speech_token, llm_embedding,
                                            source_speech_token)

            def synth(chunk: list[int], finalize: bool, speed_: float = 1.0) -> torch.Tensor:
                if not chunk:
                    raise ValueError("no speech tokens to synthesise (the LLM produced none)")
                return self.token2wav(token=torch.tensor([chunk], dtype=torch.int32),
                                      prompt_token=flow_prompt_speech_token, prompt_feat=prompt_speech_feat,
                                      embedding=flow_embedding, uuid=session, finalize=finalize, speed=speed_)

            if stream:
                token_hop_len = self.token_min_hop_len
                while True:
                    while len(tokens) < token_hop_len + self.token_overlap_len and pull():
                        pass
                    if len(tokens) < token_hop_len + self.token_overlap_len:
                        break  # the LLM has finished; the rest is the final chunk
                    speech = synth(tokens[:token_hop_len + self.token_overlap_len], finalize=False)
                    yield {"tts_speech": speech.cpu()}
                    with self.lock:
                        del tokens[:token_hop_len]
                    token_hop_len = min(self.token_max_hop_len, int(token_hop_len * self.stream_scale_factor))
                yield {"tts_speech": synth(list(tokens), finalize=True).cpu()}
            else:
                while pull():
                    pass
                yield {"tts_speech": synth(list(tokens), finalize=True, speed_=speed).cpu()}
        finally:
            self._close_session(session)


# --------------------------------------------------------------------------------------------------
# CosyVoice 2 and 3
# --------------------------------------------------------------------------------------------------


class CosyVoice2Model(CosyVoiceModel):
    """CosyVoice 2 token-level synthesis: a chunk-causal flow, so streaming needs no mel overlap.

    Streaming (upstream ``CosyVoice2Model.tts``): the flow is re-run on all tokens so far (plus
    ``pre_lookahead_len`` look-ahead tokens) with chunk masks (``streaming=True``) and only the mel
    of the new ``token_hop_len`` tokens is kept (``token_offset``). The first hop is padded so that
    prompt + first hop fill whole 25-token chunks, the training chunk size; each later hop doubles
    (``stream_scale_factor`` 2) up to 100 tokens. The vocoder (non-causal HiFT) gets the last
    ``mel_cache_len`` 8 mel frames of the previous chunk again, with their excitation source, and its
    last 8 x 480 samples are cross-faded into the next chunk (hift cache). The final chunk runs the
    flow without chunk masks, as upstream.

    Deviations from upstream, on purpose (besides those of :class:`CosyVoiceModel`): the growing hop
    is kept per session; upstream grows ``self.token_hop_len`` itself, so every later session of the
    same model object starts streaming with 100-token hops. The vocoder runs in FP32 under ``fp16``.
    """

    generation = "v2"
    # upstream CosyVoice3Model's FSQ silence/breath ids; runs of more than max_silent_tokens are dropped
    silent_tokens: tuple[int, ...] = ()
    max_silent_tokens = 5

    def _init_stream_params(self) -> None:
        self.mel_hop = int(getattr(self.hift, "upsample_scale", 480))
        self.token_mel_ratio = int(getattr(self.flow, "token_mel_ratio", 2))
        self.pre_lookahead_len = int(getattr(self.flow, "pre_lookahead_len", 3))
        # must match the flow's training static_chunk_size (25 tokens)
        self.token_hop_len = 25
        self.token_max_hop_len = 4 * self.token_hop_len
        self.stream_scale_factor = 2
        if self.stream_scale_factor < 1:
            raise ValueError("stream_scale_factor must be >= 1")
        self.mel_cache_len = 8
        self.source_cache_len = int(self.mel_cache_len * self.mel_hop)
        self.speech_window = _hamming(2 * self.source_cache_len)

    @property
    def sample_rate(self) -> int:
        return int(getattr(self.hift, "sampling_rate", 24000))

    # ------------------------------------------------------------------ speech tokens
    def speech_tokens(self, text: Any, prompt_text: torch.Tensor, llm_prompt_speech_token: torch.Tensor,
                      llm_embedding: torch.Tensor) -> Iterator[int]:
        """LLM speech tokens; ``text`` may also be an iterator of (1, n) id tensors (bistream input).

        Silence tokens (v3) are passed on at most ``max_silent_tokens`` in a row, as upstream's llm_job.
        """
        d = self.device
        common = dict(
            prompt_text=prompt_text.to(d),
            prompt_text_len=torch.tensor([prompt_text.shape[1]], dtype=torch.int32, device=d),
            prompt_speech_token=llm_prompt_speech_token.to(d),
            prompt_speech_token_len=torch.tensor([llm_prompt_speech_token.shape[1]], dtype=torch.int32, device=d),
            embedding=llm_embedding.to(d),
        )
        if isinstance(text, torch.Tensor):
            gen = self.llm.inference(text=text.to(d), text_len=torch.tensor([text.shape[1]], dtype=torch.int32,
                                                                               device=d), **common)
        else:
            gen = self.llm.inference_bistream(text=(torch.as_tensor(t).to(d) for t in text), **common)
        silent = set(self.silent_tokens)
        run = 0
        while True:
            with self.llm_context, self.autocast():
                token = next(gen, None)
            if token is None:
                return
            token = int(token)
            if token in silent:
                run += 1
                if run > self.max_silent_tokens:
                    continue
            else:
                run = 0
            yield token

    # ------------------------------------------------------------------ tokens -> waveform
    def _flow_mel(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                  embedding: torch.Tensor, token_offset: int, stream: bool, finalize: bool) -> torch.Tensor:
        """Mel (1, 80, T) of the tokens after ``token_offset`` (float32)."""
        d = self.device
        with self.autocast():
            mel, _ = self.flow.inference(
                token=token.to(d, dtype=torch.int32),
                token_len=torch.tensor([token.shape[1]], dtype=torch.int32, device=d),
                prompt_token=prompt_token.to(d),
                prompt_token_len=torch.tensor([prompt_token.shape[1]], dtype=torch.int32, device=d),
                prompt_feat=prompt_feat.to(d),
                prompt_feat_len=torch.tensor([prompt_feat.shape[1]], dtype=torch.int32, device=d),
                embedding=embedding.to(d),
                streaming=stream,
                finalize=finalize,
            )
        return mel.float()[:, :, token_offset * self.token_mel_ratio:]

    @torch.inference_mode()
    def token2wav(self, token: torch.Tensor, prompt_token: torch.Tensor,  # type: ignore[override]
                  prompt_feat: torch.Tensor, embedding: torch.Tensor, token_offset: int, uuid: str,
                  stream: bool = False, finalize: bool = False, speed: float = 1.0) -> torch.Tensor:
        """Tokens so far (1, T) -> the waveform of the tokens after ``token_offset`` (1, L).

        Upstream v2/v3's signature (``token_offset`` before ``uuid``, ``stream`` = chunk-masked flow).

        ``finalize=False`` drops the ``pre_lookahead_len`` look-ahead tokens' mel and holds the last
        ``source_cache_len`` samples back for the cross-fade with the next chunk.
        """
        tts_mel = self._flow_mel(token, prompt_token, prompt_feat, embedding, token_offset, stream, finalize)
        return self._vocode(tts_mel, uuid, finalize, speed)

    # ------------------------------------------------------------------ sessions
    def _open_session(self) -> str:
        session = str(uuid_lib.uuid1())
        with self.lock:
            self.tts_speech_token_dict[session], self.llm_end_dict[session] = [], False
            self.hift_cache_dict[session] = None
        return session

    def tts(self, text: Any = torch.zeros(1, 0, dtype=torch.int32),
            flow_embedding: torch.Tensor = torch.zeros(0, 192),
            llm_embedding: torch.Tensor = torch.zeros(0, 192),
            prompt_text: torch.Tensor = torch.zeros(1, 0, dtype=torch.int32),
            llm_prompt_speech_token: torch.Tensor = torch.zeros(1, 0, dtype=torch.int32),
            flow_prompt_speech_token: torch.Tensor = torch.zeros(1, 0, dtype=torch.int32),
            prompt_speech_feat: torch.Tensor = torch.zeros(1, 0, 80),
            source_speech_token: torch.Tensor = torch.zeros(1, 0, dtype=torch.int32),
            stream: bool = False, speed: float = 1.0, **kwargs: Any) -> Generator[dict[str, torch.Tensor], None, None]:
        """Yield ``{'tts_speech': (1, L) float CPU tensor}``: one item, or one per chunk with ``stream``.

        ``text`` may be an iterator of token-id tensors (upstream's streaming text input, bistream).
        """
        session = self._open_session()
        try:
            tokens, pull = self._token_feed(session, text, prompt_text, llm_prompt_speech_token, llm_embedding,
                                            source_speech_token)

            def synth(n: int | None, offset: int, finalize: bool, stream_: bool, speed_: float = 1.0) -> torch.Tensor:
                chunk = tokens if n is None else tokens[:n]
                if not chunk:
                    raise ValueError("no speech tokens to synthesise (the LLM produced none)")
                return self.token2wav(token=torch.tensor([chunk], dtype=torch.int32),
                                      prompt_token=flow_prompt_speech_token, prompt_feat=prompt_speech_feat,
                                      embedding=flow_embedding, uuid=session, finalize=finalize, speed=speed_,
                                      token_offset=offset, stream=stream_)

            if stream:
                token_offset = 0
                n_prompt = int(flow_prompt_speech_token.shape[1])
                prompt_token_pad = int(math.ceil(n_prompt / self.token_hop_len) * self.token_hop_len - n_prompt)
                hop = self.token_hop_len
                while True:
                    this_hop = hop + prompt_token_pad if token_offset == 0 else hop
                    need = token_offset + this_hop + self.pre_lookahead_len
                    while len(tokens) < need and pull():
                        pass
                    if len(tokens) < need:
                        break  # the LLM has finished; the rest is the final chunk
                    speech = synth(need, token_offset, finalize=False, stream_=True)
                    token_offset += this_hop
                    hop = min(self.token_max_hop_len, hop * self.stream_scale_factor)
                    yield {"tts_speech": speech.cpu()}
                # upstream's final chunk runs the flow without chunk masks (stream not passed)
                yield {"tts_speech": synth(None, token_offset, finalize=True, stream_=False).cpu()}
            else:
                while pull():
                    pass
                yield {"tts_speech": synth(None, 0, finalize=True, stream_=False, speed_=speed).cpu()}
        finally:
            self._close_session(session)


class CosyVoice3Model(CosyVoice2Model):
    """CosyVoice 3: as CosyVoice 2, with a causal vocoder and silence-run trimming.

    The vocoder cache is upstream v3's: all mel so far is kept and the causal HiFT is re-run on it
    every chunk (``finalize=False`` holds back the frames that still lack right context); only the
    samples past those already yielded are returned, so there is no cross-fade. Runs of more than 5
    of the FSQ silence/breath tokens are cut from the LLM output, as upstream.
    """

    generation = "v3"
    silent_tokens = (1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323)

    @torch.inference_mode()
    def token2wav(self, token: torch.Tensor, prompt_token: torch.Tensor,  # type: ignore[override]
                  prompt_feat: torch.Tensor, embedding: torch.Tensor, token_offset: int, uuid: str,
                  stream: bool = False, finalize: bool = False, speed: float = 1.0) -> torch.Tensor:
        tts_mel = self._flow_mel(token, prompt_token, prompt_feat, embedding, token_offset, stream, finalize)
        cache = self.hift_cache_dict[uuid]
        if cache is not None:
            tts_mel = torch.concat([cache["mel"], tts_mel], dim=2)
            cache["mel"] = tts_mel
        else:
            cache = self.hift_cache_dict[uuid] = {"mel": tts_mel, "speech_offset": 0}
        if speed != 1.0:
            if token_offset != 0 or not finalize:
                raise ValueError("speed != 1.0 is only supported without streaming")
            tts_mel = F.interpolate(tts_mel, size=int(tts_mel.shape[2] / speed), mode="linear")
        tts_speech, _ = self.hift.inference(speech_feat=tts_mel, finalize=finalize)
        tts_speech = tts_speech[:, cache["speech_offset"]:]
        cache["speech_offset"] += tts_speech.shape[1]
        return tts_speech
