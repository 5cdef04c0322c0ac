"""Speech recognition: LibriSpeech (or any corpus in its layout) transcribed by Whisper, scored by WER.

Rows (tasks/base.py) carry `audio` (a file path, or encoded bytes from a hub dataset) in place of a
question; `target` is the transcript the model learns (lower-cased LibriSpeech text), `answers` the
reference, `group` "clean" or "other" (the LibriSpeech part), `subset` the split ("test-clean").

Where the data comes from (DataSource):

    path: <root>             a LibriSpeech tree: <root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
                             with <speaker>-<chapter>.trans.txt ("<utt id> TRANSCRIPT" per line); <root> may
                             also be the folder that holds LibriSpeech/ (as the official tarballs unpack)
    name: openslr/librispeech_asr   the hub copy (configs clean / other), for users with internet
    name: builtin:spoken-tiny       the corpus synthesized here with eSpeak NG (audio/corpus.py), in the
                                    same layout, read by the same loader

`split` names one or more LibriSpeech splits joined by "+": "test-clean+test-other" is the paper's
test set with both parts, reported per part as groups. The hub copy takes the same names
(test-clean → config clean, split test; train-other-500 → other, train.500; dev-* → validation).

Scoring, as the paper's Table 4: reference and hypothesis go through Whisper's English text
normaliser (the spelling map shipped with openai-whisper, MIT, in assets/whisper/), then WER and CER
are corpus-level — total edits over total reference words / characters, as jiwer and the paper compute
them, not a mean of per-utterance rates — and ACC = 1 − WER. Difficulty uses each utterance's own
WER, where lower is better: scoring.thresholds cut it in ascending order (WER ≤ t → the easier class).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from flexi_workflows.errors import DataError
from flexi_workflows.metrics import _edit_distance
from flexi_workflows.tasks.base import DataSource, Row, Selected, Task, select_rows

BUILTIN_PREFIX = "builtin:"
AUDIO_SUFFIXES = (".flac", ".wav")
HUB_SPLITS = {  # LibriSpeech split name → (hub config, hub split) of openslr/librispeech_asr
    "train-clean-100": ("clean", "train.100"), "train-clean-360": ("clean", "train.360"),
    "train-other-500": ("other", "train.500"), "dev-clean": ("clean", "validation"),
    "dev-other": ("other", "validation"), "test-clean": ("clean", "test"), "test-other": ("other", "test"),
}
_UTT_ID = re.compile(r"^\d+-\d+-\d+$")


@lru_cache(maxsize=1)
def english_normalizer():
    """Whisper's EnglishTextNormalizer with its British→American spelling map."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    mapping = json.loads((Path(__file__).resolve().parents[1] / "assets" / "whisper" / "english_spelling.json").read_text())
    return EnglishTextNormalizer(mapping)


def normalize_transcript(text: str) -> str:
    return english_normalizer()(text)


def error_counts(reference: str, hypothesis: str) -> dict[str, int]:
    """Word and character edits after normalisation, with the reference's word and character counts."""
    ref, hyp = normalize_transcript(reference), normalize_transcript(hypothesis)
    ref_words, hyp_words = ref.split(), hyp.split()
    ref_chars, hyp_chars = " ".join(ref_words), " ".join(hyp_words)
    return {"word_errors": _edit_distance(ref_words, hyp_words), "ref_words": len(ref_words),
            "char_errors": _edit_distance(list(ref_chars), list(hyp_chars)), "ref_chars": len(ref_chars)}


def _rate(errors: float, total: float) -> float:
    return errors / total if total else float(errors > 0)


def split_names(split: str) -> list[str]:
    parts = [p.strip() for p in split.split("+") if p.strip()]
    if not parts:
        raise DataError(f"speech: split {split!r} names no split (e.g. test-clean or test-clean+test-other)")
    return parts


def group_of(split: str) -> str:
    return "other" if "other" in split else "clean"


def librispeech_root(path: Path, splits: list[str]) -> Path:
    """The folder that holds the split folders: `path` itself or its LibriSpeech/ subfolder."""
    for root in (path, path / "LibriSpeech"):
        if all((root / s).is_dir() for s in splits):
            return root
    found = sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    missing = [s for s in splits if not (path / s).is_dir() and not (path / "LibriSpeech" / s).is_dir()]
    raise DataError(f"{path}: no split folder {', '.join(missing)} (LibriSpeech layout "
                    f"<root>/<split>/<speaker>/<chapter>/; folders here: {', '.join(found) or 'none'})")


def read_transcripts(trans: Path) -> dict[str, tuple[str, int]]:
    """Utterance id → (transcript, line number) from one `<speaker>-<chapter>.trans.txt`."""
    out: dict[str, tuple[str, int]] = {}
    with open(trans, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            if not _UTT_ID.match(uid):
                raise DataError(f"{trans}:{lineno}: expected '<speaker>-<chapter>-<utterance> TRANSCRIPT', got {line.strip()[:60]!r}")
            if not text.strip():
                raise DataError(f"{trans}:{lineno}: utterance {uid} has an empty transcript")
            if uid in out:
                raise DataError(f"{trans}:{lineno}: utterance {uid} is listed twice (first on line {out[uid][1]})")
            out[uid] = (text.strip(), lineno)
    return out


def load_librispeech_split(root: Path, split: str, source_name: str) -> list[Row]:
    """Every utterance of one split folder, transcripts matched to audio files by id (both ways)."""
    import soundfile as sf

    folder = root / split
    rows: list[Row] = []
    for chapter in sorted(p for p in folder.glob("*/*") if p.is_dir()):
        speaker_id, chapter_id = chapter.parent.name, chapter.name
        trans = chapter / f"{speaker_id}-{chapter_id}.trans.txt"
        audio = {p.stem: p for p in chapter.iterdir() if p.suffix in AUDIO_SUFFIXES}
        if not trans.is_file():
            if audio:
                raise DataError(f"{chapter}: {len(audio)} audio files but no transcript file {trans.name}")
            continue
        lines = read_transcripts(trans)
        for uid in sorted(audio):
            if uid not in lines:
                raise DataError(f"{audio[uid]}: no transcript line for utterance {uid} in {trans}")
        for uid, (text, lineno) in sorted(lines.items()):
            if uid not in audio:
                raise DataError(f"{trans}:{lineno}: utterance {uid} has no audio file ({uid}.flac) in {chapter}")
            try:
                info = sf.info(str(audio[uid]))
            except RuntimeError as exc:  # libsndfile's errors (LibsndfileError): not an audio file, a truncated header
                raise DataError(f"{audio[uid]}: cannot decode the audio ({str(exc).splitlines()[0][:160]})") from None
            if info.frames == 0:
                raise DataError(f"{audio[uid]}: the audio file holds no samples")
            rows.append(_row(uid, str(audio[uid]), text, split, source_name, info.frames / info.samplerate))
    if not rows:
        raise DataError(f"{folder}: no utterances (expected <speaker>/<chapter>/*.flac with a .trans.txt)")
    return rows


def _row(uid: str, audio: Any, text: str, split: str, source_name: str, seconds: float | None) -> Row:
    return {"id": uid, "question": "", "context": "", "audio": audio, "target": text.lower(), "answers": [text],
            "group": group_of(split), "subset": split, "source": source_name,
            "seconds": round(float(seconds), 3) if seconds is not None else None}


def load_hub_split(name: str, split: str) -> list[Row]:
    from flexi_workflows.tasks.hub import load_hub_dataset

    if split not in HUB_SPLITS:
        raise DataError(f"{name}: split {split!r} is not a LibriSpeech split; one of {', '.join(HUB_SPLITS)}")
    config, hub_split = HUB_SPLITS[split]
    records = load_hub_dataset(name, config, hub_split)
    if "audio" in (getattr(records, "column_names", None) or []):  # encoded bytes, decoded on the workers
        from datasets import Audio  # (no torchcodec / ffmpeg needed); without the column the first row fails

        records = records.cast_column("audio", Audio(decode=False))
    rows = []
    for i, rec in enumerate(records):
        where = f"{name} ({split}) row {i}"
        audio, text = rec.get("audio"), rec.get("text")
        if not isinstance(audio, dict) or not (audio.get("bytes") or audio.get("path")):
            raise DataError(f"{where}: no `audio` with bytes or a path")
        if not text or not str(text).strip():
            raise DataError(f"{where}: empty `text`")
        uid = str(rec.get("id") or f"{split}:{i}")
        rows.append(_row(uid, audio.get("bytes") or audio.get("path"), str(text), split, name, None))
    return rows


class SpeechTask(Task):
    name = "speech"
    metric = "wer"
    modality: ClassVar[str] = "speech"
    higher_is_better: ClassVar[bool] = False
    summary_metrics: ClassVar[tuple[str, ...]] = ("wer", "cer", "acc")
    plain_template = ""

    def _load(self, source: DataSource) -> list[Row]:
        splits = split_names(source.split)
        if source.path:
            root = librispeech_root(Path(source.path).expanduser(), splits)
            rows = [r for s in splits for r in load_librispeech_split(root, s, source.label)]
        elif source.name and source.name.startswith(BUILTIN_PREFIX):
            raise DataError(f"{source.name}: built-in corpora are resolved to their folder before loading "
                            f"(flexi run / flexi score do it; in code: pipeline.resolve_builtin_data)")
        else:
            rows = [r for s in splits for r in load_hub_split(source.name, s)]
        ids = [r["id"] for r in rows]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"{source.path or source.name}: utterance {dup} appears in more than one split")
        return Selected(select_rows(rows, source))

    def user_text(self, row: Row) -> str:
        return ""

    def score(self, prediction: str, row: Row) -> float:
        """The utterance's WER (lower is better) — the difficulty metric."""
        counts = error_counts(row["answers"][0], prediction)
        return _rate(counts["word_errors"], counts["ref_words"])

    def metrics(self, prediction: str, row: Row) -> dict[str, float]:
        counts = error_counts(row["answers"][0], prediction)
        wer = _rate(counts["word_errors"], counts["ref_words"])
        return {"wer": wer, "cer": _rate(counts["char_errors"], counts["ref_chars"]), "acc": 1.0 - wer,
                **{k: float(v) for k, v in counts.items()}}

    def aggregate(self, per_row: list[dict[str, float]]) -> dict[str, float]:
        """Corpus-level WER / CER (total edits over total reference words / characters); ACC = 1 − WER."""
        words = sum(r["ref_words"] for r in per_row)
        chars = sum(r["ref_chars"] for r in per_row)
        wer = _rate(sum(r["word_errors"] for r in per_row), words)
        return {"wer": wer, "cer": _rate(sum(r["char_errors"] for r in per_row), chars), "acc": 1.0 - wer}
