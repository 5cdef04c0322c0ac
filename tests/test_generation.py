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
