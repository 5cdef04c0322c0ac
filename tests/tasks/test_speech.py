"""The speech task: LibriSpeech layout loading, audio decoding, features and WER / CER as the paper scores them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from flexi_workflows.errors import DataError
from flexi_workflows.recipes.schema import DataSource
from flexi_workflows.tasks import get_task
from flexi_workflows.tasks.speech import error_counts, normalize_transcript

UTTERANCES = {  # split → (speaker, chapter, transcripts)
    "test-clean": (1089, 134686, ["HE HOPED THERE WOULD BE STEW FOR DINNER", "STUFF IT INTO YOU HIS BELLY COUNSELLED HIM"]),
    "test-other": (1688, 142285, ["THERE WAS A KNOCK AT THE DOOR"]),
}


def write_librispeech(root: Path, rate: int = 16000) -> Path:
    """A LibriSpeech tree with tones standing in for speech (the loader reads files, not meaning)."""
    for split, (speaker, chapter, texts) in UTTERANCES.items():
        folder = root / split / str(speaker) / str(chapter)
        folder.mkdir(parents=True)
        lines = []
        for i, text in enumerate(texts):
            uid = f"{speaker}-{chapter}-{i:04d}"
            t = np.arange(int(rate * (0.5 + 0.25 * i))) / rate
            sf.write(folder / f"{uid}.flac", (0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t)).astype(np.float32), rate,
                     subtype="PCM_16")
            lines.append(f"{uid} {text}")
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def test_loader_matches_transcripts_to_audio_by_id(tmp_path):
    root = write_librispeech(tmp_path / "LibriSpeech")
    rows = get_task("speech").load(DataSource(path=str(tmp_path), split="test-clean+test-other"))  # the tarball's parent
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == {"1089-134686-0000", "1089-134686-0001", "1688-142285-0000"}
    row = by_id["1089-134686-0001"]
    assert row["answers"] == ["STUFF IT INTO YOU HIS BELLY COUNSELLED HIM"]
    assert row["target"] == "stuff it into you his belly counselled him"
    assert Path(row["audio"]) == root / "test-clean" / "1089" / "134686" / "1089-134686-0001.flac"
    assert row["seconds"] == pytest.approx(0.75)
    assert (row["group"], row["subset"]) == ("clean", "test-clean")
    assert by_id["1688-142285-0000"]["group"] == "other"


def test_missing_transcript_line_names_the_audio_file(tmp_path):
    root = write_librispeech(tmp_path)
    trans = root / "test-clean" / "1089" / "134686" / "1089-134686.trans.txt"
    trans.write_text(trans.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match=r"1089-134686-0001\.flac: no transcript line for utterance 1089-134686-0001"):
        get_task("speech").load(DataSource(path=str(root), split="test-clean"))


def test_transcript_without_audio_names_file_and_line(tmp_path):
    root = write_librispeech(tmp_path)
    (root / "test-clean" / "1089" / "134686" / "1089-134686-0001.flac").unlink()
    with pytest.raises(DataError, match=r"1089-134686\.trans\.txt:2: utterance 1089-134686-0001 has no audio file"):
        get_task("speech").load(DataSource(path=str(root), split="test-clean"))


def test_corrupt_and_empty_flac_are_errors_naming_the_file(tmp_path):
    root = write_librispeech(tmp_path)
    bad = root / "test-other" / "1688" / "142285" / "1688-142285-0000.flac"
    bad.write_bytes(b"fLaC" + bytes(range(200)))
    with pytest.raises(DataError, match=r"1688-142285-0000\.flac: cannot decode the audio"):
        get_task("speech").load(DataSource(path=str(root), split="test-other"))
    bad.unlink()  # an empty FLAC does not even open; a WAV header with no samples does
    sf.write(bad.with_suffix(".wav"), np.zeros(0, dtype=np.float32), 16000, subtype="PCM_16")
    with pytest.raises(DataError, match=r"1688-142285-0000\.wav: the audio file holds no samples"):
        get_task("speech").load(DataSource(path=str(root), split="test-other"))


def test_malformed_transcript_line_and_unknown_split(tmp_path):
    root = write_librispeech(tmp_path)
    trans = root / "test-other" / "1688" / "142285" / "1688-142285.trans.txt"
    trans.write_text("1688-142285-0000\n")
    with pytest.raises(DataError, match=r"1688-142285\.trans\.txt:1: expected|trans\.txt:1: utterance 1688-142285-0000 has an empty"):
        get_task("speech").load(DataSource(path=str(root), split="test-other"))
    with pytest.raises(DataError, match="no split folder dev-clean"):
        get_task("speech").load(DataSource(path=str(root), split="dev-clean"))


def test_audio_is_decoded_at_16k_and_features_are_whisper_log_mels(tmp_path):
    from transformers import WhisperFeatureExtractor

    from flexi_workflows.audio.io import read_audio
    from flexi_workflows.data.speech import audio_features

    path = tmp_path / "a.flac"
    sf.write(path, np.zeros(22050, dtype=np.float32) + 0.1, 22050, subtype="PCM_16")  # 1 s at 22.05 kHz
    wave = read_audio(path)
    assert wave.dtype == np.float32 and len(wave) == 16000

    class Processor:  # only the feature extractor is read
        feature_extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=4)

    feats = audio_features(Processor(), [str(path), path.read_bytes()])
    assert tuple(feats.shape) == (2, 80, 400)  # 4 s window: 400 frames of 10 ms
    assert np.allclose(feats[0].numpy(), feats[1].numpy())  # a path and its bytes decode the same


def test_a_training_batch_from_read_only_label_arrays_warns_nothing(tmp_path):
    """Ray Data hands a worker's collate function read-only numpy arrays; torch.from_numpy warned about that
    on every speech training run's console."""
    import warnings

    from transformers import WhisperFeatureExtractor

    from flexi_workflows.data.speech import collate_speech

    path = tmp_path / "a.flac"
    sf.write(path, np.zeros(16000, dtype=np.float32) + 0.1, 16000, subtype="PCM_16")

    class Processor:  # only the feature extractor is read
        feature_extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=4)

    labels = [np.asarray([5, 6, 7], dtype=np.int64), np.asarray([8], dtype=np.int64)]
    for ids in labels:
        ids.setflags(write=False)
    batch = {"audio": np.asarray([str(path), str(path)]), "labels": labels, "id": np.asarray(["a", "b"])}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = collate_speech(batch, Processor())
    assert out["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert tuple(out["input_features"].shape) == (2, 80, 400)


def test_whisper_normaliser_then_wer_and_cer_on_hand_checked_pairs():
    assert normalize_transcript("Mr. Smith's colour, isn't it?") == "mister smith is color is not it"  # 's → is, as Whisper's own
    # one substitution (dinner → diner) in eight words; case and punctuation do not count
    c = error_counts("HE HOPED THERE WOULD BE STEW FOR DINNER", "He hoped there would be stew for diner.")
    assert (c["word_errors"], c["ref_words"]) == (1, 8)
    assert (c["char_errors"], c["ref_chars"]) == (1, len("he hoped there would be stew for dinner"))
    task = get_task("speech")
    row = {"answers": ["THERE WAS A KNOCK AT THE DOOR"]}
    m = task.metrics("there was knock at the door door", row)  # one deletion, one insertion
    assert m["wer"] == pytest.approx(2 / 7) and m["acc"] == pytest.approx(1 - 2 / 7)
    # corpus-level: total edits over total words, not the mean of per-utterance rates
    rows = [task.metrics("a b", {"answers": ["a b c d"]}), task.metrics("x", {"answers": ["y"]})]
    agg = task.aggregate(rows)
    assert agg["wer"] == pytest.approx(3 / 5) and agg["acc"] == pytest.approx(2 / 5)


def test_wer_thresholds_put_low_wer_utterances_in_the_easy_class():
    from flexi_workflows.scoring.difficulty import assign_classes

    wer = [0.0, 0.1, 0.2, 0.5, 1.3]
    assert assign_classes(wer, [0.1], higher_is_better=False).tolist() == [0, 0, 1, 1, 1]
    assert assign_classes(wer, [0.1, 0.5], higher_is_better=False).tolist() == [0, 0, 1, 1, 2]


def test_speech_recipe_thresholds_must_ascend():
    from flexi_workflows.errors import ConfigError
    from flexi_workflows.recipes.loader import build
    from flexi_workflows.recipes.schema import Recipe

    base = {"task": {"name": "speech"}, "scoring": {"num_classes": 3, "thresholds": [0.5, 0.1]},
            "method": {"name": "flexi", "ranks": [1, 2, 8]}}
    with pytest.raises(ConfigError, match="strictly increasing for task speech"):
        build(Recipe, base, source="recipe")
    base["scoring"]["thresholds"] = [0.1, 0.5]
    assert build(Recipe, base, source="recipe").scoring.thresholds == [0.1, 0.5]


def test_hub_copy_rows_keep_encoded_audio_and_map_librispeech_split_names(tmp_path, monkeypatch):
    """openslr/librispeech_asr for users with internet: its split names map to (config, split), the audio
    stays encoded bytes (decoded on the workers), and a row without text names the dataset and row."""
    import datasets

    from flexi_workflows.tasks import hub

    root = write_librispeech(tmp_path)
    flac = (root / "test-clean" / "1089" / "134686" / "1089-134686-0000.flac").read_bytes()
    asked = []

    def fake_hub(name, config, split):
        asked.append((name, config, split))
        ds = datasets.Dataset.from_dict({"id": ["1089-134686-0000"], "text": ["HE HOPED"],
                                         "audio": [{"bytes": flac, "path": None}]})
        return ds.cast_column("audio", datasets.Audio(decode=False))

    monkeypatch.setattr(hub, "load_hub_dataset", fake_hub)
    rows = get_task("speech").load(DataSource(name="openslr/librispeech_asr", split="test-other"))
    assert asked == [("openslr/librispeech_asr", "other", "test")]
    assert rows[0]["audio"] == flac and rows[0]["group"] == "other" and rows[0]["answers"] == ["HE HOPED"]

    def no_text(name, config, split):
        return datasets.Dataset.from_dict({"id": ["x"], "text": [""], "audio": [{"bytes": flac, "path": None}]})

    monkeypatch.setattr(hub, "load_hub_dataset", no_text)
    with pytest.raises(DataError, match=r"openslr/librispeech_asr \(dev-clean\) row 0: empty `text`"):
        get_task("speech").load(DataSource(name="openslr/librispeech_asr", split="dev-clean"))
    with pytest.raises(DataError, match="not a LibriSpeech split"):
        get_task("speech").load(DataSource(name="openslr/librispeech_asr", split="test"))
