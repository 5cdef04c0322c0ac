"""Where a sweep's trials keep their records (sweep/run.py records_home), without Ray: the folder logic."""

from __future__ import annotations

import json
from pathlib import Path

from flexi_workflows.storage import Storage
from flexi_workflows.sweep.run import mirror_records, records_home, write_record
from flexi_workflows.sweep.space import Trial
from tests.helpers import small_recipe


def test_without_storage_the_records_are_the_sweep_folders_own(tmp_path):
    recipe = small_recipe(tmp_path, tmp_path / "model")
    store, prefix = records_home(recipe, Path(recipe.output_dir).resolve(), "abc")
    assert prefix == "" and store.local == Path(recipe.output_dir).resolve()


def test_with_storage_elsewhere_trials_write_there_and_the_driver_gets_copies(tmp_path):
    """`storage` a folder every node mounts (or s3://): records, summaries and Tune's state live under
    sweeps/<fingerprint>/ there; mirror_records copies records and summaries into <output_dir>/trials/,
    replacing an older copy, and leaves out a trial that wrote nothing."""
    shared = tmp_path / "shared"
    recipe = small_recipe(tmp_path, tmp_path / "model", storage=str(shared))
    sweep_dir = Path(recipe.output_dir).resolve()
    store, prefix = records_home(recipe, sweep_dir, "f00d")
    assert prefix == "sweeps/f00d" and store.local == shared.resolve()

    done, lost = Trial("t000-a", {"seed": 0}), Trial("t001-b", {"seed": 1})
    write_record(store, f"{prefix}/trials/{done.trial_id}.json", {"trial_id": done.trial_id, "status": "FINISHED"})
    store.write_bytes(f"{prefix}/trials/{done.trial_id}/summary.json", b'{"rows": []}')
    stale = sweep_dir / "trials" / done.trial_id
    stale.mkdir(parents=True)
    (stale / "old.txt").write_text("from an earlier copy")

    assert mirror_records(store, prefix, sweep_dir, [done, lost]) == 1
    assert json.loads((sweep_dir / "trials" / f"{done.trial_id}.json").read_text())["status"] == "FINISHED"
    assert sorted(p.name for p in stale.iterdir()) == ["summary.json"]
    assert not (sweep_dir / "trials" / f"{lost.trial_id}.json").exists()
    assert Storage(shared).exists(f"{prefix}/trials/{done.trial_id}.json"), "the records stay in storage"
