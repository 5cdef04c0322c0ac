"""Speech end to end on real components: a corpus synthesized with eSpeak NG, a tiny Whisper, Ray Data
generation, a 2-worker DeepSpeed ZeRO-2 training with per-utterance ranks on Ray Train, and WER /
CER / ACC per part in the summary and in MLflow (a real tracking server on 127.0.0.1)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flexi_workflows.pipeline import run_pipeline
from flexi_workflows.recipes.loader import build
from flexi_workflows.recipes.schema import Recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    """(corpus folder, tiny Whisper folder): a few utterances per split, and a randomly initialised model."""
    from flexi_workflows.audio.corpus import CorpusSpec, build_corpus
    from flexi_workflows.fsutil import atomic_dir
    from flexi_workflows.models.tiny_whisper import tiny_whisper, train_whisper_tokenizer
    from flexi_workflows.tasks.speech import load_librispeech_split

    root = tmp_path_factory.mktemp("speech")
    corpus = build_corpus(root / "corpus", CorpusSpec(pretrain_clean=8, train_clean=12, train_other=12, dev_clean=2,
                                                        dev_other=2, test_clean=4, test_other=4, workers=1))
    texts = [r["target"] for r in load_librispeech_split(corpus, "pretrain-clean", "c")]
    model, processor = tiny_whisper(train_whisper_tokenizer(texts * 20, vocab_size=300), d_model=32, layers=1, heads=2,
                                    ffn=64)
    with atomic_dir(root / "whisper") as tmp:
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
    return corpus, root / "whisper"


def speech_recipe(tmp_path: Path, corpus: Path, model: Path, **sections) -> Recipe:
    data = {
        "name": "speech-test", "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(model)},
        "task": {"name": "speech", "train": {"name": "spoken", "path": str(corpus), "split": "train-clean+train-other"},
                 "eval": [{"name": "spoken", "path": str(corpus), "split": "test-clean+test-other"}],
                 "max_target_tokens": 24},
        "method": {"name": "flexi", "ranks": [2, 8], "dropout": 0.0},
        "scoring": {"max_new_tokens": 6, "batch_size": 8, "thresholds": [0.1]},
        "router": {"epochs": 30},
        "training": {"epochs": 1, "lr": 0.01, "micro_batch_size": 4, "log_every": 1, "warmup_ratio": 0.0},
        "distribution": {"num_workers": 2, "cpus_per_worker": 1, "strategy": "deepspeed", "zero_stage": 2},
        "evaluation": {"batch_size": 4, "max_new_tokens": 6},
        **sections,
    }
    return build(Recipe, data)


def record_speech_scores(recipe: Recipe) -> None:
    """Score artifacts with known classes: the clean utterances transcribed right, the other ones wrong (a
    random tiny Whisper gets every utterance wrong, which leaves no easy class to route)."""
    from flexi_workflows.stages.base import StageOutput, run_stage
    from flexi_workflows.stages.score import SCORED, STATS, ScoreStage, build_scored_table
    from flexi_workflows.tasks import get_task

    class RecordedScores(ScoreStage):
        def run(self, tmp, upstream, context):
            rows = get_task("speech").load(self.recipe.task.train)
            outputs = {r["id"]: {"prompt": r["id"], "prediction": r["target"] if r["group"] == "clean" else "no"}
                       for r in rows}
            table, stats = build_scored_table(rows, outputs, self.recipe)
            pq.write_table(table, tmp / SCORED)
            (tmp / STATS).write_text(json.dumps(stats))
            return StageOutput(metrics={"scored_rows": len(rows)}, artifacts=[STATS])

    run_stage(RecordedScores(recipe))


def test_speech_pipeline_two_worker_zero2_mixed_ranks_reports_wer_cer_acc(tmp_path, spoken, ray_local, mlflow_server):
    corpus, model = spoken
    recipe = speech_recipe(tmp_path, corpus, model, compare=[{"name": "lora", "rank": 8, "dropout": 0.0}],
                           tracking={"enabled": True, "tracking_uri": mlflow_server, "experiment": "speech-test"})
    record_speech_scores(recipe)
    summary = run_pipeline(recipe)
    out = Path(recipe.output_dir)

    assert summary["metric"] == "wer" and summary["lower_is_better"] is True
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"base", "flexi-2-8", "lora-8"}
    for row in rows.values():
        for metric in ("wer", "cer", "acc"):
            for part in ("all", "clean", "other"):
                assert isinstance(row[f"{metric}_{part}"], float), (row["method"], metric, part)
        assert row["acc_all"] == pytest.approx(1 - row["wer_all"])
    # the router learned clean → easy (rank 2), other → hard (rank 8) from the audio's conv stem
    flexi = rows["flexi-2-8"]
    assert flexi["high_rank_rate_clean"] < flexi["high_rank_rate_other"]

    # both workers trained, on micro-batches that mixed the two ranks
    train_dir = next((out / "train").glob("flexi-2-8-*"))
    report = json.loads((train_dir / "train_report.json").read_text())
    used = report["ranks_used"]
    assert used["workers"] == [0, 1]
    assert set(used["rows_by_rank"]) == {"2", "8"}
    records = json.loads((train_dir / "ranks_used.json").read_text())
    assert any(r["rank"] is None for r in records), "some micro-batch mixed ranks 2 and 8"
    assert report["steps"] >= 1

    # MLflow, read back over REST: the eval runs carry every metric per part
    exp = json.loads(urllib.request.urlopen(
        f"{mlflow_server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=speech-test").read())
    request = urllib.request.Request(f"{mlflow_server}/api/2.0/mlflow/runs/search",
                                     data=json.dumps({"experiment_ids": [exp["experiment"]["experiment_id"]]}).encode(),
                                     headers={"Content-Type": "application/json"})
    runs = {r["info"]["run_name"]: r for r in json.loads(urllib.request.urlopen(request).read())["runs"]}
    metrics = {m["key"]: m["value"] for m in runs["eval:flexi-2-8"]["data"]["metrics"]}
    for key in ("spoken.wer", "spoken.wer_clean", "spoken.wer_other", "spoken.cer_clean", "spoken.acc_other"):
        assert key in metrics, key
    assert metrics["spoken.wer"] == pytest.approx(flexi["wer_all"])


def test_training_leaves_out_utterances_longer_than_the_window(tmp_path, spoken):
    """A 5-second utterance does not fit the tiny Whisper's 4-second window: training leaves it out (its
    features would end mid-sentence under a whole transcript) and says how many it left out."""
    import numpy as np
    import soundfile as sf

    from flexi_workflows.methods import get_method
    from flexi_workflows.stages.train import training_examples

    _, model = spoken
    folder = tmp_path / "ls" / "train-clean" / "7" / "70"
    folder.mkdir(parents=True)
    for i, seconds in enumerate((1.0, 5.0, 2.0)):
        sf.write(folder / f"7-70-{i:04d}.flac", 0.1 * np.sin(np.arange(int(16000 * seconds)) / 9.0), 16000,
                 subtype="PCM_16")
    (folder / "7-70.trans.txt").write_text("7-70-0000 THE DOG\n7-70-0001 A VERY LONG ONE\n7-70-0002 THE CAT\n")
    recipe = speech_recipe(tmp_path, tmp_path / "ls", model, method={"name": "lora", "rank": 2})
    recipe.task.train.split = "train-clean"
    examples, info = training_examples(recipe, get_method(recipe.method), None)
    assert [e["id"] for e in examples] == ["7-70-0000", "7-70-0002"]
    assert info["rows"] == 2 and info["left_out_over_window"] == 1
