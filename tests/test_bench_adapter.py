"""The README's smoke run of bench/adapter.py, verbatim: its last line is JSON with the merged-inference
figures, and merged per-class generation gave the unmerged tokens (fp32)."""

from __future__ import annotations

import json
import shlex
import subprocess

from tests.conftest import REPO_ROOT

SMOKE = (".venv/bin/python bench/adapter.py --quick --hidden 64 --layers 1 --vocab 512 --seq 32 --batch 4 "
         "--prompt 8 --new-tokens 4 --repeats 1")


def test_adapter_bench_smoke_run_reports_merged_generation():
    assert SMOKE in (REPO_ROOT / "README.md").read_text(), "the README shows this command"
    done = subprocess.run(shlex.split(SMOKE), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(result)[-1] == "merged_generate_ratio_vs_base" and result["merged_generate_ratio_vs_base"] > 0
    assert result["merged_tokens_equal_unmerged"] is True
    assert {"flexi merged", "merged cold", "merged uniform", "frozen base"} <= set(result["generate_s"])
    assert result["merged_cold_generate_ratio_vs_base"] > 0
    assert result["base_again_ratio_vs_base"] > 0 and "base again" in result["generate_s"], "the null control"
    assert set(result["paired_ratio_vs_base"]) == {"flexi merged", "merged cold", "merged uniform", "base again",
                                                   "merged stream"}
    assert all(v > 0 for v in result["paired_ratio_vs_base"].values())


def test_each_round_starts_one_variant_further_along():
    """No variant always runs first in its round: a fixed order put the frozen base first every time, and
    its second timing later in each round (the null control) read 1.03 × the first on average."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_adapter", REPO_ROOT / "bench" / "adapter.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    order: list[str] = []
    variants = {name: (None, None) for name in ("a", "b", "c")}
    medians, times = bench.measure(variants, lambda name, model, ranks: order.append(name), repeats=3, warmup=1)
    rounds = [order[i:i + 3] for i in range(0, len(order), 3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert set(medians) == set(variants) and all(len(t) == 3 for t in times.values())  # warm-up round not timed
