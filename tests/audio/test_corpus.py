"""The built-in spoken corpus: eSpeak synthesis, the LibriSpeech layout, disjoint splits, determinism,
and "other" measurably harder than "clean"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("espeakng_loader")
sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")

from flexi_workflows.audio import corpus as corpus_mod
from flexi_workflows.audio.corpus import (
    MAX_SECONDS,
    SPLITS,
    VOCABULARY,
    CorpusSpec,
    build_corpus,
    resolve_builtin_corpus,
)
from flexi_workflows.audio.espeak import Espeak
from flexi_workflows.errors import ConfigError

SMALL = {"pretrain_clean": 12, "train_clean": 6, "train_other": 6, "dev_clean": 4, "dev_other": 4,
         "test_clean": 5, "test_other": 5}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("corpus") / "c", CorpusSpec(**SMALL, workers=2))


def read_split(root: Path, split: str) -> list[tuple[str, str, Path]]:
    rows = []
    for trans in sorted((root / split).glob("*/*/*.trans.txt")):
        for line in trans.read_text().splitlines():
            utt_id, text = line.split(" ", 1)
            rows.append((utt_id, text, trans.parent / f"{utt_id}.flac"))
    return rows


def snr_estimate_db(x: np.ndarray) -> float:
    """Loudest fifth of 20 ms frames against the quietest tenth."""
    x = x.astype(np.float64)
    energy = np.sort((x[: len(x) // 320 * 320].reshape(-1, 320) ** 2).mean(1) + 1e-9)
    loud, quiet = energy[-len(energy) // 5:].mean(), energy[: max(1, len(energy) // 10)].mean()
    return float(10 * np.log10(loud / quiet))


def test_synthesis_gives_speech():
    audio, rate = Espeak().synthesize("the small dog finds three red apples", voice="en")
    assert rate == 22050 and audio.dtype == np.int16 and audio.ndim == 1
    assert 0.8 < audio.size / rate < 3.5 and np.abs(audio).max() > 3000


def test_unknown_voice_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown"):
        Espeak().synthesize("hello", voice="xx-nope")
    with pytest.raises(ConfigError, match="unknown"):
        Espeak().synthesize("hello", voice="en+nope")


def test_librispeech_layout_and_transcripts(small):
    meta = json.loads((small / "corpus.json").read_text())
    assert meta["format_version"] == corpus_mod.CORPUS_VERSION and meta["sample_rate"] == 16000
    vocabulary = {w.upper() for w in VOCABULARY}
    chapters = {}
    for split in SPLITS:
        rows = read_split(small, split)
        assert len(rows) == SMALL[split.replace("-", "_")] == meta["splits"][split]["utterances"]
        flacs = {p for p in (small / split).glob("*/*/*.flac")}
        assert flacs == {p for _, _, p in rows}  # transcript ids ↔ files, one to one
        for utt_id, text, path in rows:
            speaker, chapter, utt = utt_id.split("-")
            assert path.parent == small / split / speaker / chapter and len(utt) == 4
            assert text == text.upper() and 3 <= len(text.split()) <= 7 and set(text.split()) <= vocabulary
            chapters.setdefault((speaker, chapter), set()).add(split)
            audio, rate = sf.read(path, dtype="int16")
            assert rate == 16000 and audio.ndim == 1 and 0.3 < audio.size / rate < MAX_SECONDS
            assert sf.info(path).subtype == "PCM_16"
    assert all(len(s) == 1 for s in chapters.values())  # no (speaker, chapter) folder shared by two splits
    clean = {s for (s, _), sp in chapters.items() if next(iter(sp)).endswith("clean")}
    other = {s for (s, _), sp in chapters.items() if next(iter(sp)).endswith("other")}
    assert clean and other and not clean & other


def test_no_text_shared_between_splits():
    texts = corpus_mod.plan_texts(CorpusSpec())  # the default spec: 4,300 sentences
    seen: dict[str, str] = {}
    for split, part in texts.items():
        assert len(part["texts"]) == CorpusSpec().size(split)
        for text in part["texts"] + part["reserve"]:
            assert seen.setdefault(text, split) == split, f"{text!r} in {seen[text]} and {split}"
        assert len(set(part["texts"])) == len(part["texts"])


def test_rebuild_is_byte_identical(small, tmp_path):
    again = build_corpus(tmp_path / "again", CorpusSpec(**SMALL, workers=1))
    files = sorted(p.relative_to(small) for p in small.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (small / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_other_is_faster_and_noisier_and_duration_follows_text(tmp_path):
    spec = CorpusSpec(pretrain_clean=0, train_clean=0, train_other=0, dev_clean=0, dev_other=0,
                      test_clean=40, test_other=40)
    root = build_corpus(tmp_path / "c", spec)
    stats = {}
    for split in ("test-clean", "test-other"):
        words, seconds, snr = [], [], []
        for _, text, path in read_split(root, split):
            audio, rate = sf.read(path, dtype="int16")
            words.append(len(text.split()))
            seconds.append(audio.size / rate)
            snr.append(snr_estimate_db(audio))
        words, seconds = np.array(words), np.array(seconds)
        assert np.corrcoef(words, seconds)[0, 1] > 0.5  # text ↔ audio pairing: longer sentences last longer
        stats[split] = (np.mean(words / seconds), np.median(snr))
    (clean_wps, clean_snr), (other_wps, other_snr) = stats["test-clean"], stats["test-other"]
    assert other_wps > 1.2 * clean_wps
    assert other_snr < clean_snr - 8


def test_unknown_builtin_corpus(tmp_path):
    with pytest.raises(ConfigError, match="builtin:spoken-tiny"):
        resolve_builtin_corpus("builtin:nope", tmp_path)


def test_resolve_builds_once_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setitem(corpus_mod.BUILTIN_CORPORA, "spoken-test", CorpusSpec(**{k: 2 for k in SMALL}))
    first = resolve_builtin_corpus("builtin:spoken-test", tmp_path)
    assert first.name.startswith("spoken-test-") and (first / "corpus.json").is_file()
    stamp = (first / "corpus.json").stat().st_mtime_ns, first.stat().st_mtime_ns
    assert resolve_builtin_corpus("builtin:spoken-test", tmp_path) == first
    assert ((first / "corpus.json").stat().st_mtime_ns, first.stat().st_mtime_ns) == stamp
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [first.name]  # no temp folder left behind


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "CLEAN_VOICES", ["en+nope"])
    monkeypatch.setitem(corpus_mod.SPEAKERS, "en+nope", 199)
    with pytest.raises(Exception, match="en\\+nope"):
        build_corpus(tmp_path / "c", CorpusSpec(**{k: 1 for k in SMALL}))
    assert list(tmp_path.iterdir()) == []
