"""`build_report` on synthetic sweep folders: the averages must be the trials' own numbers, averaged once.

Expected values are recomputed here with numpy straight from the trial dicts the test wrote, so a bug in
the report's grouping cannot hide behind the same bug in the expectation.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest

from flexi_workflows.errors import ConfigError
from flexi_workflows.report import build_report, format_table, setting_columns
from flexi_workflows.report_plots import pareto_front

DATASETS = ["arith", "gsm"]
PAIRS = [[2, 8], [4, 8]]
SIGMAS = [0.1, 0.2]
SEEDS = [1, 2, 3]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUMERIC = ["accuracy_all", "accuracy_easy", "accuracy_hard", "mean_active_params", "params_pct_of_lora8",
           "high_rank_rate", "mean_rank", "exotic_score"]


def _rnd(*parts) -> random.Random:
    return random.Random(repr(parts))


def _base_row(dataset: str, metric: str = "accuracy") -> dict:
    r = _rnd("base", dataset)
    return {"method": "base", "dataset": dataset, "ranks": [], "fingerprint": f"base-{dataset}",
            f"{metric}_all": r.uniform(0.3, 0.5), f"{metric}_easy": r.uniform(0.6, 0.8),
            f"{metric}_hard": r.uniform(0.1, 0.2), "mean_active_params": 0, "params_pct_of_lora8": 0.0,
            "params_pct_of_base": 0.0, "high_rank_rate": None, "mean_rank": None, "rank_shares": None}


def _lora_row(dataset: str, seed: int, metric: str = "accuracy") -> dict:
    r = _rnd("lora8", dataset, seed)
    return {"method": "lora-8", "dataset": dataset, "ranks": [8], "fingerprint": f"lora8-{dataset}-s{seed}",
            f"{metric}_all": r.uniform(0.4, 0.6), f"{metric}_easy": r.uniform(0.6, 0.9),
            f"{metric}_hard": r.uniform(0.1, 0.3), "mean_active_params": 36864, "params_pct_of_lora8": 100.0,
            "params_pct_of_base": 0.5, "high_rank_rate": 1.0, "mean_rank": 8.0, "rank_shares": {"8": 1.0},
            "exotic_score": r.uniform(0, 10), "flag": True}


def _flexi_row(dataset: str, pair: list[int], sigma: float, seed: int, metric: str = "accuracy") -> dict:
    r = _rnd("flexi", dataset, tuple(pair), sigma, seed)
    high = r.uniform(0.3, 0.7)
    low_rank, high_rank = pair
    return {"method": f"flexi-{low_rank}-{high_rank}", "dataset": dataset, "ranks": pair,
            "fingerprint": f"flexi-{pair}-{sigma}-{dataset}-s{seed}",
            f"{metric}_all": r.uniform(0.4, 0.6), f"{metric}_easy": r.uniform(0.6, 0.9),
            f"{metric}_hard": r.uniform(0.1, 0.3), "mean_active_params": int(r.uniform(15000, 30000)),
            "params_pct_of_lora8": r.uniform(40, 80), "params_pct_of_base": 0.3, "high_rank_rate": high,
            "mean_rank": low_rank + high * (high_rank - low_rank),
            "rank_shares": {str(low_rank): 1 - high, str(high_rank): high}, "exotic_score": r.uniform(0, 10)}


def _write_sweep(root: Path, sweep: dict, trials: list[dict]) -> Path:
    (root / "trials").mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps(sweep))
    for trial in trials:
        (root / "trials" / f"{trial['trial_id']}.json").write_text(json.dumps(trial))
    return root


def _sigma_trials(pairs=PAIRS, failed=((4, 8), 0.2, 3)) -> list[dict]:
    """2 rank pairs × 2 σ × 3 seeds; every trial also reports the shared base and LoRA-8 rows."""
    trials = []
    for pair in pairs:
        for sigma in SIGMAS:
            for seed in SEEDS:
                tid = f"t{len(trials):04d}"
                overrides = {"method.ranks": pair, "router.noise_std": sigma, "seed": seed}
                if (tuple(pair), sigma, seed) == failed:
                    trials.append({"trial_id": tid, "overrides": overrides, "status": "FAILED",
                                   "error": "CUDA out of memory", "seconds": 3.0})
                    continue
                rows = []
                for ds in DATASETS:
                    rows += [_base_row(ds), _lora_row(ds, seed), _flexi_row(ds, pair, sigma, seed)]
                trials.append({"trial_id": tid, "overrides": overrides, "status": "FINISHED", "error": None,
                               "seconds": 80.0, "summary": {"metric": "accuracy", "lower_is_better": False,
                                                            "rows": rows}})
    return trials


SIGMA_SWEEP = {"name": "sweep-test", "metric": "accuracy_all", "mode": "max", "task_metric": "accuracy",
               "lower_is_better": False, "varied": ["method.ranks", "router.noise_std", "seed"]}


@pytest.fixture
def sigma_sweep(tmp_path):
    trials = _sigma_trials()
    return _write_sweep(tmp_path / "sweep", SIGMA_SWEEP, trials), trials


def _expected(trials, method, dataset, column, where=lambda overrides: True) -> np.ndarray:
    """The distinct results (one per fingerprint) of finished trials, straight from the input dicts."""
    values = {}
    for trial in trials:
        if trial["status"] != "FINISHED" or not where(trial["overrides"]):
            continue
        for row in trial["summary"]["rows"]:
            if row["method"] == method and row["dataset"] == dataset and row.get(column) is not None:
                values[row["fingerprint"]] = row[column]
    return np.array(list(values.values()), dtype=float)


def _rows(report, **match):
    return [r for r in report["rows"] if all(r.get(k) == v for k, v in match.items())]


def test_flexi_means_and_stds_match_numpy(sigma_sweep):
    root, trials = sigma_sweep
    report = build_report(root)
    for pair in PAIRS:
        method = f"flexi-{pair[0]}-{pair[1]}"
        for sigma in SIGMAS:
            for ds in DATASETS:
                (row,) = _rows(report, method=method, dataset=ds, noise_std=sigma)
                where = lambda ov, pair=pair, sigma=sigma: ov["method.ranks"] == pair and ov["router.noise_std"] == sigma
                assert row["ranks"] == pair
                assert row["seeds"] == len(_expected(trials, method, ds, "accuracy_all", where))
                for col in NUMERIC:
                    values = _expected(trials, method, ds, col, where)
                    assert row[f"{col}_mean"] == pytest.approx(values.mean()), col
                    assert row[f"{col}_std"] == pytest.approx(values.std(ddof=1)), col
    # the failed trial (4-8, σ=0.2, seed 3) leaves two results there
    assert {r["seeds"] for r in _rows(report, method="flexi-4-8", noise_std=0.2)} == {2}
    # a bool column is not numeric
    assert not any(k.startswith("flag") for r in report["rows"] for k in r)


def test_shared_baselines_collapse_to_one_row_per_dataset(sigma_sweep):
    root, trials = sigma_sweep
    report = build_report(root)
    for ds in DATASETS:
        (lora,) = _rows(report, method="lora-8", dataset=ds)
        assert lora["noise_std"] is None and lora["seeds"] == 3
        values = _expected(trials, "lora-8", ds, "accuracy_all")
        assert len(values) == 3
        assert lora["accuracy_all_mean"] == pytest.approx(values.mean())
        assert lora["accuracy_all_std"] == pytest.approx(values.std(ddof=1))
        assert lora["exotic_score_mean"] == pytest.approx(_expected(trials, "lora-8", ds, "exotic_score").mean())
        assert lora["rank_shares"] == {"8": pytest.approx(1.0)}

        (base,) = _rows(report, method="base", dataset=ds)
        assert base["noise_std"] is None and base["seeds"] == 1
        assert base["accuracy_all_mean"] == pytest.approx(_base_row(ds)["accuracy_all"])
        assert base["accuracy_all_std"] == 0.0
        assert base["accuracy_all_ci95_low"] is None and base["accuracy_all_ci95_high"] is None
        assert base["high_rank_rate_mean"] is None and base["rank_shares"] is None
    # sorted by dataset, then active parameters (base first), then method
    assert [r["dataset"] for r in report["rows"]] == sorted(r["dataset"] for r in report["rows"])
    first = report["rows"][0]
    assert first["method"] == "base" and first["dataset"] == "arith"
    assert report["rows"][-1]["method"] == "lora-8"


def test_failed_trials_are_listed_not_averaged(sigma_sweep):
    root, trials = sigma_sweep
    report = build_report(root)
    failed_ids = [t["trial_id"] for t in trials if t["status"] == "FAILED"]
    assert [f["trial_id"] for f in report["failed_trials"]] == failed_ids
    assert report["failed_trials"][0]["error"] == "CUDA out of memory"
    assert report["trials"] == len(trials) == 12
    assert failed_ids[0] not in {tid for r in report["rows"] for tid in r["trial_ids"]}
    on_disk = json.loads((root / "report" / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["metric"] == "accuracy_all" and on_disk["task_metric"] == "accuracy"
    assert on_disk["varied"] == SIGMA_SWEEP["varied"] and on_disk["lower_is_better"] is False


def test_ci95_uses_student_t_for_three_seeds(sigma_sweep):
    root, trials = sigma_sweep
    report = build_report(root)
    (row,) = _rows(report, method="flexi-2-8", dataset="gsm", noise_std=0.1)
    values = _expected(trials, "flexi-2-8", "gsm", "accuracy_all",
                       lambda ov: ov["method.ranks"] == [2, 8] and ov["router.noise_std"] == 0.1)
    assert len(values) == 3
    half = 4.303 * values.std(ddof=1) / math.sqrt(3)
    assert row["accuracy_all_ci95_low"] == pytest.approx(values.mean() - half)
    assert row["accuracy_all_ci95_high"] == pytest.approx(values.mean() + half)
    # only the task metric's _all column gets an interval
    assert "accuracy_easy_ci95_low" not in row


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")][1:]


def _mean_of(cell: str) -> float:
    return float(cell.strip("*").split("±")[0])


def test_table_has_average_and_params_rows_and_bolds_the_best(sigma_sweep):
    root, trials = sigma_sweep
    report = build_report(root)
    text = (root / "report" / "table.md").read_text()
    assert text == format_table(report)
    lines = text.splitlines()
    header = _cells(lines[0])
    assert "lora-8" in header and "base" in header and "flexi-2-8 noise_std=0.1" in header
    body = {line.split("|")[1].strip(): line for line in lines[2:] if line.startswith("|")}
    main_rows = {"arith", "gsm", "Average", "#", "seeds"}
    assert main_rows <= set(body) and {name.split(" · ")[0] for name in set(body) - main_rows} <= set(DATASETS)
    for ds in DATASETS:
        # the 95 % interval row: mean ± t(0.975, 2) · std / √3
        values = 100 * _expected(trials, "lora-8", ds, "accuracy_all")
        half = 4.303 * values.std(ddof=1) / math.sqrt(3)
        ci = _cells(body[f"{ds} · 95 % interval"])[header.index("lora-8")]
        assert ci == f"{values.mean() - half:.1f}–{values.mean() + half:.1f}"
    for ds in DATASETS:
        cells = _cells(body[ds])
        bold = [c for c in cells if c.startswith("**")]
        assert len(bold) == 1
        assert _mean_of(bold[0]) == max(_mean_of(c) for c in cells)
        # the lora-8 cell is its mean ± std over the three seeds, in percent
        values = 100 * _expected(trials, "lora-8", ds, "accuracy_all")
        assert cells[header.index("lora-8")].strip("*") == f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"
    # Average: mean of the dataset means ± root-mean-square of the dataset stds
    per_ds = [100 * _expected(trials, "lora-8", ds, "accuracy_all") for ds in DATASETS]
    mean = np.mean([v.mean() for v in per_ds])
    rms = math.sqrt(np.mean([v.std(ddof=1) ** 2 for v in per_ds]))
    assert _cells(body["Average"])[header.index("lora-8")].strip("*") == f"{mean:.1f} ± {rms:.1f}"
    assert _cells(body["#"])[header.index("lora-8")] == "36,864 (100.0%)"
    assert _cells(body["seeds"])[header.index("lora-8")] == "3"
    assert "One seed: a demonstration" not in text and "does not depend on the seed" in text
    assert "root-mean-square" in text

    with open(root / "report" / "table.csv", newline="") as f:
        table = list(csv.reader(f))
    assert [r[0] for r in table[1:]] == ["arith", "gsm", "Average", "#"]
    col = table[0].index("lora-8")
    assert table[0][col + 1] == "lora-8 mean (%)" and table[0][col + 2] == "lora-8 std (%)"
    assert float(table[1][col + 1]) == pytest.approx(100 * _expected(trials, "lora-8", "arith", "accuracy_all").mean(),
                                                    abs=1e-3)


def _assert_png(path: Path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.shape[0] > 0 and image.shape[1] > 0


def test_writes_valid_pngs_atomically_and_replaces_stale_files(sigma_sweep):
    root, _ = sigma_sweep
    (root / "report").mkdir()
    (root / "report" / "stale.png").write_bytes(b"old")
    report = build_report(root)
    out = root / "report"
    names = {"report.json", "table.md", "table.csv", "pareto.png", "rank_shares.png", "metric_vs_noise.png"}
    assert {p.name for p in out.iterdir()} == names  # stale file gone, no temp files left
    assert sorted(Path(f).name for f in report["files"]) == sorted(names)
    for name in ("pareto.png", "rank_shares.png", "metric_vs_noise.png"):
        _assert_png(out / name)


def _wer_sweep(tmp_path: Path) -> tuple[Path, list[dict]]:
    """A speech sweep (WER, lower is better) that varies only the seed: no σ curve, no routed method."""
    trials = []
    for seed in SEEDS:
        rows = [_base_row("libri", "wer"), _lora_row("libri", seed, "wer")]
        trials.append({"trial_id": f"w{seed}", "overrides": {"seed": seed}, "status": "FINISHED", "error": None,
                       "seconds": 5.0, "summary": {"metric": "wer", "lower_is_better": True, "rows": rows}})
    sweep = {"name": "speech", "metric": "wer_all", "mode": "min", "task_metric": "wer", "lower_is_better": True,
             "varied": ["seed"]}
    return _write_sweep(tmp_path / "speech", sweep, trials), trials


def test_lower_is_better_bolds_the_minimum(tmp_path):
    root, trials = _wer_sweep(tmp_path)
    report = build_report(root)
    lines = (root / "report" / "table.md").read_text().splitlines()
    header = _cells(lines[0])
    (line,) = [l for l in lines if l.startswith("| libri |")]
    cells = _cells(line)
    bold = [c for c in cells if c.startswith("**")]
    assert len(bold) == 1 and _mean_of(bold[0]) == min(_mean_of(c) for c in cells)
    base, lora = _base_row("libri", "wer")["wer_all"], _expected(trials, "lora-8", "libri", "wer_all").mean()
    assert header[cells.index(bold[0])] == ("base" if base < lora else "lora-8")
    (row,) = _rows(report, method="lora-8")
    assert row["wer_all_ci95_low"] is not None
    out = root / "report"
    assert not (out / "metric_vs_noise.png").exists()  # σ not varied
    _assert_png(out / "rank_shares.png")  # still written, saying there is nothing routed
    _assert_png(out / "pareto.png")


def test_overlapping_results_collapse_even_when_a_trial_failed(tmp_path):
    # one rank pair: the failed σ=0.2 seed-3 trial leaves LoRA-8 under σ=0.2 with two of the three results
    trials = _sigma_trials(pairs=[[4, 8]])
    report = build_report(_write_sweep(tmp_path / "one", SIGMA_SWEEP, trials))
    for ds in DATASETS:
        (lora,) = _rows(report, method="lora-8", dataset=ds)
        assert lora["seeds"] == 3 and lora["noise_std"] is None


def test_missing_sweep_json_names_the_path(tmp_path):
    (tmp_path / "trials").mkdir()
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "sweep.json"))):
        build_report(tmp_path)


def test_no_trials_and_broken_trial_json_are_config_errors(tmp_path):
    root = _write_sweep(tmp_path / "empty", SIGMA_SWEEP, [])
    with pytest.raises(ConfigError, match=re.escape(str(root / "trials"))):
        build_report(root)
    (root / "trials" / "t0001.json").write_text('{"trial_id": "t0001", "status": ')
    with pytest.raises(ConfigError, match=re.escape(str(root / "trials" / "t0001.json"))):
        build_report(root)
    assert not (root / "report").exists()


def test_setting_columns_use_full_key_when_names_clash():
    assert setting_columns(["method.ranks", "router.noise_std", "seed"]) == {"router.noise_std": "noise_std"}
    assert setting_columns(["train.lr", "router.lr", "train.epochs"]) == {
        "train.lr": "train.lr", "router.lr": "router.lr", "train.epochs": "epochs"}
    assert setting_columns(["method", "training.lr"]) == {"method": "setting.method", "training.lr": "lr"}


def test_pareto_front_respects_direction():
    points = [{"x": 0, "y": 40}, {"x": 10, "y": 50}, {"x": 20, "y": 45}, {"x": 30, "y": 60}]
    assert [p["x"] for p in pareto_front(points)] == [0, 10, 30]
    assert [p["x"] for p in pareto_front(points, lower_is_better=True)] == [0]


def test_a_sweep_where_every_trial_failed_still_reports_the_failures(tmp_path):
    trials = [{"trial_id": "t0", "overrides": {"router.noise_std": 0.1, "seed": 1}, "status": "FAILED",
               "error": "boom"}]
    report = build_report(_write_sweep(tmp_path / "bad", SIGMA_SWEEP, trials))
    assert report["rows"] == [] and report["failed_trials"][0]["error"] == "boom"
    assert (tmp_path / "bad" / "report" / "report.json").exists()
    assert "all 1 trials failed" in format_table(report)


def test_dataset_notes_mark_the_table_and_reach_the_csv_and_json(tmp_path):
    """A set that is not the paper's split (MultiArith's 600-item copy) is labelled wherever it is reported."""
    note = "MultiArith (LLM-Adapters copy, 600 items; not the paper's 180-item split)"
    trials = _sigma_trials(pairs=[[2, 8]])
    for trial in trials:
        for row in (trial.get("summary") or {}).get("rows", []):
            row["note"] = note if row["dataset"] == "gsm" else None
    root = _write_sweep(tmp_path / "noted", SIGMA_SWEEP, trials)
    report = build_report(root)
    assert {r["note"] for r in report["rows"] if r["dataset"] == "gsm"} == {note}
    assert {r["note"] for r in report["rows"] if r["dataset"] == "arith"} == {None}
    text = (root / "report" / "table.md").read_text()
    assert "| gsm† |" in text and "| arith |" in text
    assert f"† gsm: {note}" in text.splitlines()
    with open(root / "report" / "table.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0][-1] == "note"
    assert {r[0]: r[-1] for r in table[1:3]} == {"arith": "", "gsm": note}
    assert json.loads((root / "report" / "report.json").read_text())["rows"][0]["note"] in (None, note)


def test_a_sweep_over_whole_methods_labels_columns_by_method_and_what_tells_them_apart(tmp_path):
    """`sweep.space.method` varies whole method configs: a column is the method's label, plus only the
    config keys that differ between configs sharing that label (never the whole JSON config)."""
    methods = [{"name": "lora", "rank": 8, "alpha": 16}, {"name": "flexi", "ranks": [2, 8], "alpha": 16},
               {"name": "flexi", "ranks": [2, 8], "alpha": 16, "scaling": "constant"}]
    trials = []
    for i, method in enumerate(methods):
        for seed in SEEDS:
            row = (_lora_row("arith", seed) if method["name"] == "lora"
                   else _flexi_row("arith", [2, 8], float(i), seed))
            trials.append({"trial_id": f"t{len(trials):03d}", "overrides": {"method": method, "seed": seed},
                           "status": "FINISHED", "error": None, "seconds": 1.0,
                           "summary": {"metric": "accuracy", "lower_is_better": False,
                                       "rows": [_base_row("arith"), row]}})
    sweep = {**SIGMA_SWEEP, "varied": ["method", "seed"]}
    report = build_report(_write_sweep(tmp_path / "sweep", sweep, trials))
    header = _cells(format_table(report).splitlines()[0])
    assert sorted(header) == ["base", "flexi-2-8", "flexi-2-8 scaling=constant", "lora-8"]
    assert all("{" not in label for label in header)
    assert all(r["seeds"] == 3 for r in report["rows"] if r["method"] != "base")
