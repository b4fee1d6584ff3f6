"""Spoken words synthesized with espeak-ng, as log-mel spectrograms: constants, the features and the readers.

The arrays are built once by `python -m deltatune.data.build_speech` (which needs espeak-ng and SciPy, build time
only) and shipped in files/ (float16 safetensors); this module reads them and holds the log-mel front end the
build used (our own STFT power spectrum and mel filterbank, in torch), so a user can featurize new audio the same way.

Front end: 16 kHz mono, 25 ms Hann window (400 samples) zero-padded to a 512-point FFT, 10 ms hop (160), no
centring; power spectrum; 64 triangular mel filters (HTK mel scale, 0-8,000 Hz, peak 1, not area-normalized);
natural log of (energy + 1e-6); then standardized with the pretraining train split's mean and twice its std
(`FEATURE_MEAN`, `FEATURE_SCALE`, as AST does) so values sit roughly in [-2, 2]. A clip is 13,152 samples
(0.822 s) -> exactly 80 frames: features are (64 mel bins, 80 frames), low frequencies first.
"""
from __future__ import annotations

import torch

from deltatune.data.glyphs import FILES_DIR
from deltatune.errors import DeltatuneError

SAMPLE_RATE = 16_000
WINDOW, HOP, FFT_SIZE = 400, 160, 512
MEL_BINS, FRAMES = 64, 80
# torch.stft pads the 400-sample window to 512 (centred), so a frame spans 512 samples: 13,152 -> 80 frames
CLIP_SAMPLES = FFT_SIZE + (FRAMES - 1) * HOP
MEL_LOW_HZ, MEL_HIGH_HZ = 0.0, SAMPLE_RATE / 2
LOG_FLOOR = 1e-6
# Measured on the pretraining train split by build_speech (also in files/speech_manifest.json).
FEATURE_MEAN, FEATURE_SCALE = -4.32, 6.62  # the measured mean -4.3242 and 2 x std 3.3111

# A speech-commands-like vocabulary: 25 words for pretraining, 10 never heard in pretraining.
PRETRAIN_WORDS = (
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "backward", "forward", "follow", "learn", "visual",
)
NOVEL_WORDS = ("bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029",
           "en-us-nyc")
# espeak-ng voice variants (the speaker); the keyword splits are disjoint by variant, as Speech Commands is by speaker
VARIANT_SPLITS = {
    "train": ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "klatt", "klatt2", "adam", "Andy"),
    "validation": ("m6", "f4", "klatt3"),
    "test": ("m7", "f5", "klatt4"),
}
# The speaker-voice task: 12 fixed accent + variant voices
SPEAKER_VOICES = (
    "en-us+m1", "en-gb+m2", "en-gb-scotland+m3", "en-gb-x-rp+f1", "en-029+f2", "en-us-nyc+m4", "en-gb-x-gbclan+f3",
    "en-gb-x-gbcwmd+m5", "en-us+f4", "en-gb+klatt", "en-gb-x-rp+m6", "en-029+klatt2",
)
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
FILES = {
    "keywords-train": "speech-keywords-train.safetensors",
    "keywords-eval": "speech-keywords-eval.safetensors",
    "novel": "speech-novel.safetensors",
    "voices": "speech-voices.safetensors",
}
MANIFEST_FILE = "speech_manifest.json"
LICENSE_FILE = "ESPEAK_NG_NOTE.txt"


class SpeechDataError(DeltatuneError):
    """The shipped speech arrays are missing or malformed."""


def hz_to_mel(hz: torch.Tensor | float) -> torch.Tensor:
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_centers(bins: int = MEL_BINS) -> torch.Tensor:
    """The bins + 2 edge frequencies (Hz) of the triangles: evenly spaced in mel between MEL_LOW_HZ and MEL_HIGH_HZ."""
    low, high = hz_to_mel(MEL_LOW_HZ), hz_to_mel(MEL_HIGH_HZ)
    return mel_to_hz(torch.linspace(float(low), float(high), bins + 2, dtype=torch.float64))


def mel_filterbank(bins: int = MEL_BINS, fft_size: int = FFT_SIZE, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """(bins, fft_size // 2 + 1) float32 triangles over the FFT bin frequencies: filter m rises from edge m to 1
    at edge m + 1 and falls to 0 at edge m + 2 (peak 1, so neighbours sum to 1 between the first and last peak)."""
    edges = mel_centers(bins)
    freqs = torch.arange(fft_size // 2 + 1, dtype=torch.float64) * sample_rate / fft_size
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - left) / (center - left)
    falling = (right - freqs[None, :]) / (right - center)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


def log_mel(waveforms: torch.Tensor) -> torch.Tensor:
    """Raw log-mel energies (B, MEL_BINS, frames) of 16 kHz waveforms (B, samples), float32, before standardizing."""
    window = torch.hann_window(WINDOW, periodic=True, dtype=torch.float32, device=waveforms.device)
    spectrum = torch.stft(waveforms.float(), n_fft=FFT_SIZE, hop_length=HOP, win_length=WINDOW, window=window,
                          center=False, return_complex=True)
    power = spectrum.real ** 2 + spectrum.imag ** 2  # (B, FFT_SIZE // 2 + 1, frames)
    filters = mel_filterbank().to(waveforms.device)
    return torch.log(torch.einsum("mf,bft->bmt", filters, power) + LOG_FLOOR)


def standardize(log_energies: torch.Tensor) -> torch.Tensor:
    """The model's input scale: (log-mel - FEATURE_MEAN) / FEATURE_SCALE."""
    return (log_energies - FEATURE_MEAN) / FEATURE_SCALE


def spectrogram(waveforms: torch.Tensor) -> torch.Tensor:
    """Model input (B, 1, MEL_BINS, frames) float32 from 16 kHz waveforms (B, CLIP_SAMPLES)."""
    return standardize(log_mel(waveforms)).unsqueeze(1)


def read_speech(kind: str) -> dict[str, torch.Tensor]:
    """One shipped array file: `features` (N, 64, 80) float16, int64 `labels`, `splits`, `voices`, `speeds`,
    `pitches` (see build_speech for what the ids mean)."""
    from safetensors.torch import load_file

    if kind not in FILES:
        raise SpeechDataError(f"unknown speech array {kind!r}: expected one of {', '.join(FILES)}")
    path = FILES_DIR / FILES[kind]
    if not path.is_file():
        raise SpeechDataError(f"speech arrays not found at {path}: expected the packaged file; reinstall "
                              "deltatune or rebuild them with `python -m deltatune.data.build_speech`")
    arrays = load_file(str(path))
    if arrays["features"].shape[1:] != (MEL_BINS, FRAMES):
        raise SpeechDataError(f"{path} holds features of shape {tuple(arrays['features'].shape)}: expected "
                              f"(N, {MEL_BINS}, {FRAMES}); rebuild with `python -m deltatune.data.build_speech`")
    return arrays


def split_arrays(arrays: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(spectrograms (n, 1, 64, 80) float32, labels) of one split of an array file."""
    keep = arrays["splits"] == SPLIT_IDS[split]
    return arrays["features"][keep].float().unsqueeze(1).contiguous(), arrays["labels"][keep].clone()

