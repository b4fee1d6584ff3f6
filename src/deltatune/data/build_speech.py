"""Synthesize the committed spoken-word arrays with espeak-ng (build time only: espeak-ng and SciPy).

    python -m deltatune.data.build_speech [--espeak /usr/bin/espeak-ng] [--out DIR] [--seed 0]

Writes, into src/deltatune/data/files/ by default, four float16 safetensors files (see deltatune.data.speech for
the log-mel front end) and `speech_manifest.json` (every clip's word, voice, speed and pitch are in the arrays;
the manifest has the build command, the seed, espeak-ng's version, the voices, the counts per split and label,
the feature statistics and every file's sha256), plus `ESPEAK_NG_NOTE.txt` (licence note).

- `speech-keywords-train` / `speech-keywords-eval`: the 25 pretraining words (speech.PRETRAIN_WORDS); train 36
  clips per word spoken by the 12 train variants, validation 8 per word (3 other variants), test 12 per word
  (3 more variants): splits disjoint by speaker (espeak-ng voice variant), like Speech Commands.
- `speech-novel`: the 10 words never heard in pretraining (speech.NOVEL_WORDS), same variant split, 44 / 8 / 16
  clips per word.
- `speech-voices`: which of 12 fixed voices (accent + variant, speech.SPEAKER_VOICES) spoke; split by word:
  train = the 25 pretraining words, validation = 4 novel words, test = the other 6; 2 clips per voice and word.

One clip (seed, file, index -> `random.Random(f"{seed}:{file}:{index}")`): keyword clips draw the accent from the
8 English accents, the variant from the split's, speed 140-200 words per minute and pitch 25-75 (espeak-ng's 0-99
scale); voice clips speed 140-200 and pitch 40-60 (the voice stays recognizable). espeak-ng writes 22,050 Hz
16-bit mono; it is resampled to 16 kHz (SciPy's polyphase `resample_poly(320, 441)`), leading and trailing
silence below 1% of the peak trimmed, scaled by a gain of 0.5-1.5 (after peak normalization to 0.5), placed at a
random offset of 0-150 ms in the 0.822 s window (cropped at its end when longer), and given white noise at a
signal-to-noise ratio of 15-40 dB (numpy `default_rng` seeded from the clip's draw). The arrays hold the
standardized log-mel of each clip, float16.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import subprocess
import sys
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from deltatune.core.atomic import atomic_write_text
from deltatune.data.glyphs import FILES_DIR
from deltatune.data.speech import (
    ACCENTS,
    CLIP_SAMPLES,
    FILES,
    LICENSE_FILE,
    MANIFEST_FILE,
    NOVEL_WORDS,
    PRETRAIN_WORDS,
    SAMPLE_RATE,
    SPEAKER_VOICES,
    SPLIT_IDS,
    VARIANT_SPLITS,
    SpeechDataError,
    log_mel,
    standardize,
)

ESPEAK = "/usr/bin/espeak-ng"
ESPEAK_RATE = 22_050
KEYWORD_CLIPS = {"train": 36, "validation": 8, "test": 12}  # per word
NOVEL_CLIPS = {"train": 44, "validation": 8, "test": 16}
VOICE_TAKES = 2  # per voice and word
VOICE_WORD_SPLITS = {"train": PRETRAIN_WORDS, "validation": NOVEL_WORDS[:4], "test": NOVEL_WORDS[4:]}
MAX_OFFSET_SECONDS = 0.15
SILENCE_SHARE = 0.01


def voice_list() -> list[str]:
    """Every voice the arrays use (their `voices` ids index this list): accent x keyword variant, then the
    speaker-task voices not already in it."""
    variants = [variant for split in SPLIT_IDS for variant in VARIANT_SPLITS[split]]
    voices = [f"{accent}+{variant}" for accent in ACCENTS for variant in variants]
    return voices + [voice for voice in SPEAKER_VOICES if voice not in voices]


def synthesize(espeak: str, voice: str, speed: int, pitch: int, word: str) -> np.ndarray:
    """espeak-ng's waveform (float64 in [-1, 1], 22,050 Hz) for one word."""
    command = [espeak, "--stdout", "-v", voice, "-s", str(speed), "-p", str(pitch), word]
    result = subprocess.run(command, capture_output=True, check=False)  # noqa: S603  (fixed argument list)
    if result.returncode != 0 or len(result.stdout) < 100:
        raise SpeechDataError(f"espeak-ng failed for {command}: {result.stderr.decode(errors='replace')[:200]}; "
                              "install the Debian package espeak-ng or pass --espeak")
    with wave.open(io.BytesIO(result.stdout)) as reader:
        rate, width = reader.getframerate(), reader.getsampwidth()
    if rate != ESPEAK_RATE or width != 2:
        raise SpeechDataError(f"espeak-ng wrote {rate} Hz / {8 * width}-bit audio: expected 22050 Hz 16-bit")
    # --stdout streams, so the header's frame count is a placeholder: read every sample after the 44-byte header
    return np.frombuffer(result.stdout[44:], dtype="<i2").astype(np.float64) / 32768.0


def place_clip(audio: np.ndarray, rng: random.Random) -> np.ndarray:
    """Resample to 16 kHz, trim silence, gain, random offset in the fixed window, white noise at a random SNR."""
    from scipy.signal import resample_poly

    audio = resample_poly(audio, SAMPLE_RATE // 50, ESPEAK_RATE // 50)  # 320 / 441 = 16,000 / 22,050
    loud = np.flatnonzero(np.abs(audio) > SILENCE_SHARE * np.abs(audio).max())
    audio = audio[loud[0]:loud[-1] + 1]
    audio = audio / np.abs(audio).max() * 0.5 * rng.uniform(0.5, 1.5)
    window = np.zeros(CLIP_SAMPLES)
    offset = rng.randrange(int(MAX_OFFSET_SECONDS * SAMPLE_RATE) + 1)
    length = min(len(audio), CLIP_SAMPLES - offset)
    window[offset:offset + length] = audio[:length]
    signal_power = float(np.mean(audio[:length] ** 2)) * length / CLIP_SAMPLES
    snr_db = rng.uniform(15.0, 40.0)
    noise = np.random.default_rng(rng.randrange(2 ** 32)).standard_normal(CLIP_SAMPLES)
    return window + noise * np.sqrt(signal_power / 10 ** (snr_db / 10))


def keyword_plan(words: Sequence[str], clips: dict[str, int]) -> list[tuple[int, str, int]]:
    """(label, split, index within word and split) of every clip, split by split then word."""
    return [(label, split, take) for split in SPLIT_IDS for label in range(len(words))
            for take in range(clips[split])]


def render_rows(espeak: str, name: str, plan: Sequence[tuple], seed: int, draw) -> list[dict]:
    """Synthesize every clip of one file; `draw(rng, row)` -> (voice, speed, pitch, word, label, split)."""
    voices = voice_list()
    rows = []
    for index, row in enumerate(plan):
        rng = random.Random(f"{seed}:{name}:{index}")
        voice, speed, pitch, word, label, split = draw(rng, row)
        waveform = place_clip(synthesize(espeak, voice, speed, pitch, word), rng)
        rows.append({"waveform": waveform, "label": label, "split": SPLIT_IDS[split], "voice": voices.index(voice),
                     "speed": speed, "pitch": pitch})
    return rows


def keyword_draw(words: Sequence[str]):
    def draw(rng: random.Random, row: tuple) -> tuple:
        label, split, _ = row
        voice = f"{rng.choice(ACCENTS)}+{rng.choice(VARIANT_SPLITS[split])}"
        return voice, rng.randint(140, 200), rng.randint(25, 75), words[label], label, split
    return draw


def voice_draw(rng: random.Random, row: tuple) -> tuple:
    label, split, word = row
    return SPEAKER_VOICES[label], rng.randint(140, 200), rng.randint(40, 60), word, label, split


def raw_features(rows: Sequence[dict]) -> torch.Tensor:
    """Raw log-mel (N, 64, 80) float32 of the rows' waveforms, in chunks."""
    waves = torch.tensor(np.stack([row["waveform"] for row in rows]), dtype=torch.float32)
    return torch.cat([log_mel(chunk) for chunk in waves.split(256)])


def save_rows(rows: Sequence[dict], features: torch.Tensor, path: Path) -> str:
    """Write one array file (byte-reproducible) and return its sha256."""
    from safetensors.torch import save

    payload = save({
        "features": standardize(features).to(torch.float16).contiguous(),
        **{plural: torch.tensor([row[key] for row in rows], dtype=torch.int64)
           for key, plural in (("label", "labels"), ("split", "splits"), ("voice", "voices"), ("speed", "speeds"),
                               ("pitch", "pitches"))},
    })
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(payload)
    tmp.replace(path)
    return hashlib.sha256(payload).hexdigest()


def counts(rows: Sequence[dict]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for split, split_id in SPLIT_IDS.items():
        labels = [row["label"] for row in rows if row["split"] == split_id]
        table[split] = {str(label): labels.count(label) for label in sorted(set(labels))}
    return table


def licence_note(espeak: str, version: str) -> str:
    return (
        "Spoken-word features of deltatune (speech-*.safetensors)\n\n"
        f"The audio was synthesized by eSpeak NG ({version}; Debian package espeak-ng, {espeak}) and turned into\n"
        "log-mel spectrograms by deltatune's own code (deltatune.data.build_speech, deltatune.data.speech).\n"
        "Only these features ship; the engine, its voice data and the waveforms do not.\n\n"
        "eSpeak NG is licensed under the GNU General Public License version 3 or later (see\n"
        "/usr/share/doc/espeak-ng/copyright). The GPL covers the program, not its output: the synthesized speech\n"
        "and the features computed from it are this project's output, distributed under deltatune's licence.\n"
    )


def espeak_version(espeak: str) -> str:
    result = subprocess.run([espeak, "--version"], capture_output=True, text=True, check=False)  # noqa: S603
    return result.stdout.strip()


def file_plans() -> dict[str, tuple[list[tuple], object]]:
    keywords = keyword_plan(PRETRAIN_WORDS, KEYWORD_CLIPS)
    voice_rows = [(label, split, word) for split, words in VOICE_WORD_SPLITS.items() for word in words
                  for label in range(len(SPEAKER_VOICES)) for _ in range(VOICE_TAKES)]
    return {
        "keywords-train": ([row for row in keywords if row[1] == "train"], keyword_draw(PRETRAIN_WORDS)),
        "keywords-eval": ([row for row in keywords if row[1] != "train"], keyword_draw(PRETRAIN_WORDS)),
        "novel": (keyword_plan(NOVEL_WORDS, NOVEL_CLIPS), keyword_draw(NOVEL_WORDS)),
        "voices": (voice_rows, voice_draw),
    }


def build(espeak: str, out_dir: Path, seed: int = 0) -> dict:
    """Synthesize every clip, write the four array files, the licence note and the manifest; return the manifest."""
    rendered = {name: render_rows(espeak, name, plan, seed, draw) for name, (plan, draw) in file_plans().items()}
    features = {name: raw_features(rows) for name, rows in rendered.items()}
    pretrain = features["keywords-train"].double()
    files = {}
    for name, rows in rendered.items():
        files[name] = {"file": FILES[name], "clips": len(rows), "counts": counts(rows),
                       "sha256": save_rows(rows, features[name], out_dir / FILES[name])}
    version = espeak_version(espeak)
    atomic_write_text(out_dir / LICENSE_FILE, licence_note(espeak, version))
    manifest = {
        "build_command": "python -m deltatune.data.build_speech", "seed": seed, "espeak_ng": version,
        "sample_rate": SAMPLE_RATE, "clip_samples": CLIP_SAMPLES, "split_ids": SPLIT_IDS,
        "pretrain_words": list(PRETRAIN_WORDS), "novel_words": list(NOVEL_WORDS), "accents": list(ACCENTS),
        "variant_splits": VARIANT_SPLITS, "speaker_voices": list(SPEAKER_VOICES),
        "voice_word_splits": {split: list(words) for split, words in VOICE_WORD_SPLITS.items()},
        "voices": voice_list(),
        "raw_log_mel_train": {"mean": round(float(pretrain.mean()), 4), "std": round(float(pretrain.std()), 4)},
        "files": files,
    }
    atomic_write_text(out_dir / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltatune.data.build_speech", description=__doc__.split("\n")[0])
    parser.add_argument("--espeak", default=ESPEAK, help=f"the espeak-ng program (default {ESPEAK})")
    parser.add_argument("--out", default=str(FILES_DIR), help=f"output folder (default {FILES_DIR})")
    parser.add_argument("--seed", type=int, default=0, help="clip seed (the committed files use 0)")
    args = parser.parse_args(argv)
    manifest = build(args.espeak, Path(args.out), args.seed)
    sizes = {name: entry["clips"] for name, entry in manifest["files"].items()}
    print(f"{sizes} clips -> {args.out}; raw log-mel train {manifest['raw_log_mel_train']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
