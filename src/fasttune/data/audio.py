"""Audio clips for vision-language models that hear (Gemma 4 E2B / E4B): reading a clip, the processor's features
and the number of soft tokens a clip becomes.

A clip in a data row or prompt is `{"type": "audio", "audio": ...}` holding a 1-D array of samples at the feature
extractor's rate (16 kHz for Gemma 4), datasets' Audio feature value `{"array", "sampling_rate"}`, or the path of a
PCM WAV file (read with the standard library's `wave`; other formats: decode them into an array first, e.g. with
datasets' Audio feature). Clips at another rate (a dict's `sampling_rate`, a WAV file's header) are resampled to the
extractor's with soxr's high-quality resampler (what librosa uses by default); a bare array carries no rate and is
taken to be at the extractor's.
Source of the token count: transformers' Gemma4Processor (_compute_audio_num_tokens / replace_audio_token: the
frames through the audio tower's two stride-2 convolutions).
"""
from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import torch

from fasttune.data.formats import positive_number
from fasttune.data.paths import refuse_address
from fasttune.errors import DataError


class AudioClips:
    """The audio half of data/vision.py's VisionProcessor (a mixin): it needs `audio_extractor` (the checkpoint's
    feature extractor, or None for a model that takes no audio), `audio_marks` (begin token, audio token, end token)
    and `audio_token` set by the processor."""

    @property
    def sampling_rate(self) -> int:
        """The audio feature extractor's sampling rate in Hz (16,000 for Gemma 4); DataError without one."""
        if self.audio_extractor is None:
            raise DataError("This model takes no audio (its processor has no audio feature extractor); use text "
                            "and images.")
        return int(self.audio_extractor.sampling_rate)

    def process_audio(self, clips: list) -> dict:
        """Clips (1-D float arrays at `sampling_rate`) -> {"input_features" (clips, frames, mel bins) float32,
        "input_features_mask" (clips, frames) bool}, padded to the longest, as the feature extractor returns them."""
        out = self.audio_extractor(clips, sampling_rate=self.sampling_rate, return_tensors="pt", padding="longest")
        return {"input_features": torch.as_tensor(out["input_features"]).float(),
                "input_features_mask": torch.as_tensor(out["input_features_mask"]).bool()}

    def audio_counts(self, clips: list) -> list[int]:
        """Per clip (1-D arrays), the number of soft tokens it becomes (soft_token_count; from its length, so the
        features are computed once, at collate time)."""
        e = self.audio_extractor
        return [soft_token_count(len(c), int(e.frame_length), int(e.hop_length)) for c in clips]

    def expand_audio(self, text: str, counts: list[int]) -> str:
        """Each audio token of `text` replaced by the begin mark, `count` audio tokens and the end mark."""
        if self.audio_token is None:
            return text
        parts = text.split(self.audio_token)
        if len(parts) - 1 != len(counts):
            raise DataError(f"The text has {len(parts) - 1} audio placeholders but {len(counts)} clips were given.")
        begin, token, end = self.audio_marks
        return "".join([parts[0]] + [begin + token * n + end + rest for n, rest in zip(counts, parts[1:])])

    def waveforms(self, sources: list, where: str, base_dir: Path | None = None) -> list:
        """Audio sources (data/audio.to_waveform's forms) -> 1-D float32 arrays at `sampling_rate`; DataError naming
        `where` and the clip for a bad one, or for any clip when this model takes no audio."""
        if sources and self.audio_extractor is None:
            raise DataError(f"{where}: has an audio item, but this model takes no audio (only Gemma 4 E2B / E4B "
                            f"checkpoints with an audio tower do); use text and images.")
        return [to_waveform(s, f"{where}, audio clip {i + 1}", self.sampling_rate, base_dir)
                for i, s in enumerate(sources)]


def to_waveform(value, where: str, rate: int, base_dir: Path | None = None) -> np.ndarray:
    """A clip -> (samples,) float32 at `rate` Hz: an array (list, numpy, torch) taken to be at `rate`, a
    {"array", "sampling_rate"} dict (datasets' Audio feature), a {"path"} / {"bytes"} dict or a path of a PCM WAV
    file (relative to base_dir; several channels are averaged); a dict's or file's other sampling rate is resampled
    to `rate` (resample). Raises DataError naming `where` for a missing or unreadable file, a rate that is not a
    positive number, or a value that is none of these."""
    if isinstance(value, dict) and value.get("array") is not None:
        got = value.get("sampling_rate", rate)
        return resample(_samples(value["array"], where, rate), got, rate, where)
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    refuse_address(value, where, "clip")
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        path = base_dir / path if not path.is_absolute() and base_dir is not None else path
        if not path.is_file():
            raise DataError(f"{where}: audio file '{path}' does not exist. Paths in the data are relative to the data "
                            f"file's folder.")
        return _read_wav(path.read_bytes(), f"{where} ('{path}')", rate)
    if isinstance(value, (bytes, bytearray)):
        return _read_wav(bytes(value), where, rate)
    return _samples(value, where, rate)


def _samples(value, where: str, rate: int) -> np.ndarray:
    """An array (list, numpy, torch) -> (samples,) float32; DataError naming `where` for anything else."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        samples = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        samples = None
    if samples is None or samples.ndim != 1 or samples.size == 0:
        raise DataError(f"{where}: an audio clip must be a 1-D array of samples at {rate} Hz, a "
                        f"{{'array', 'sampling_rate'}} dict or a WAV file path, not {type(value).__name__}"
                        + (f" of shape {samples.shape}" if samples is not None else "") + ".")
    return samples


def resample(samples: np.ndarray, got, rate: int, where: str) -> np.ndarray:
    """(samples,) float32 at `got` Hz -> at `rate` Hz (round(len * rate / got) samples), by soxr's "HQ" resampler
    (a polyphase filter, as librosa's default); the same array when the rates agree. Raises DataError naming
    `where` for a rate that is not a positive number."""
    got = positive_number(got, where, "sampling_rate (Hz)")
    if got == rate:
        return samples
    import soxr

    return soxr.resample(samples, got, rate, quality="HQ").astype(np.float32, copy=False)


def _read_wav(data: bytes, where: str, rate: int) -> np.ndarray:
    """PCM WAV bytes -> mono float32 samples in [-1, 1) at `rate` Hz (resampled from the file's); DataError for
    another format."""
    try:
        with wave.open(io.BytesIO(data)) as f:
            got, width, channels = f.getframerate(), f.getsampwidth(), f.getnchannels()
            frames = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as e:
        raise DataError(f"{where}: not a PCM WAV file ({e}); decode other formats into an array of samples first "
                        f"(e.g. with datasets' Audio feature).") from None
    if width == 1:  # 8-bit WAV is unsigned
        samples = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        kind = np.int16 if width == 2 else np.int32
        samples = np.frombuffer(frames, dtype=kind).astype(np.float32) / float(2 ** (8 * width - 1))
    else:
        raise DataError(f"{where}: {8 * width}-bit WAV samples are not read here; use 8-, 16- or 32-bit PCM, or pass "
                        f"the samples as an array.")
    samples = samples.reshape(-1, channels).mean(axis=1) if channels > 1 else samples
    return resample(samples, got, rate, where)


def soft_token_count(samples: int, frame_length: int, hop_length: int) -> int:
    """The number of soft tokens a clip of `samples` samples becomes: its log-mel frames (Gemma4AudioFeatureExtractor's
    framing, frame_length / hop_length in samples, half a frame of left padding) through the audio tower's two
    stride-2 convolutions (kernel 3, padding 1: ceil(frames / 2) each), as transformers' Gemma4Processor counts them
    (_compute_audio_num_tokens; replace_audio_token gives the same from the feature mask)."""
    frames = max(0, (samples + frame_length // 2 - (frame_length + 1)) // hop_length + 1)
    return (frames + 3) // 4
