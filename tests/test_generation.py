"""BatchGenerator's sampling (scoring.num_samples > 1) with a tiny model, without Ray."""

from __future__ import annotations

import json

import numpy as np

from flexi_workflows.generation import BatchGenerator

BATCH = {"id": np.asarray(["a", "b"]), "question": np.asarray(["What is 2 plus 3?", "What is 7 plus 1?"]),
         "context": np.asarray(["", ""])}


def _generator(model_dir, **kw):
    return BatchGenerator(str(model_dir), "math", max_new_tokens=6, device="cpu", num_threads=1, **kw)


def test_k_sampled_answers_per_row_seeded_by_seed_and_rows(tiny_model_dir):
    sampler = _generator(tiny_model_dir, num_samples=3, temperature=1.0, top_p=1.0, seed=5)
    out = sampler(BATCH)
    samples = [json.loads(s) for s in out["samples"]]
    assert [len(s) for s in samples] == [3, 3]
    assert out["prediction"].tolist() == [s[0] for s in samples]
    # another actor (a fresh generator, other RNG history) draws the same answers for the same batch
    other = _generator(tiny_model_dir, num_samples=3, temperature=1.0, top_p=1.0, seed=5)
    other(BATCH)  # its global RNG has moved on; the batch's own seed decides
    assert [json.loads(s) for s in other(BATCH)["samples"]] == samples
    reseeded = _generator(tiny_model_dir, num_samples=3, temperature=1.0, top_p=1.0, seed=6)
    assert [json.loads(s) for s in reseeded(BATCH)["samples"]] != samples
    assert len({a for s in samples for a in s}) > 2, "sampling, not greedy: the answers differ"


def test_greedy_generation_has_no_samples_column(tiny_model_dir):
    out = _generator(tiny_model_dir)(BATCH)
    assert set(out) == {"id", "prompt", "prediction"}
    assert out["prediction"].tolist() == _generator(tiny_model_dir)(BATCH)["prediction"].tolist()


def test_whisper_generation_logs_none_of_transformers_notices_about_its_own_calls(tmp_path):
    """The speech quickstart printed three transformers notices per actor, one of them per batch, that no
    recipe setting causes or fixes (GenerateNotices); any other transformers warning still goes out."""
    import logging

    import soundfile as sf

    from tests.conftest import REPO_ROOT
    from tests.helpers import WarningsSeen

    (model_dir,) = (REPO_ROOT / "flexi_workflows" / "assets" / "builtin_models").glob("whisper-tiny-spoken-*")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"u{i}.flac"))
        sf.write(paths[-1], (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
    generation_logger, seen = logging.getLogger("transformers.generation.utils"), WarningsSeen()
    generation_logger.addHandler(seen)
    try:
        generator = BatchGenerator(str(model_dir), "speech", max_new_tokens=5, device="cpu", num_threads=1)
        for _ in range(2):
            out = generator({"id": np.asarray(["u0", "u1"]), "audio": np.asarray(paths)})
        assert len(out["prediction"]) == 2
        assert seen.messages == [], seen.messages
        generation_logger.warning("a notice a user can act on")
        assert seen.messages == ["a notice a user can act on"]
    finally:
        generation_logger.removeHandler(seen)
