"""Hugging Face hub datasets, for users with internet; every failure names the dataset."""

from __future__ import annotations

from typing import Any, Iterable

from flexi_workflows.errors import DataError


def load_hub_dataset(name: str, config: str | None, split: str) -> Iterable[dict[str, Any]]:
    try:
        import datasets

        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name, unknown split: all the user's to fix
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DataError(
            f"dataset {name!r} (split {split!r}): not a local file and the hub could not provide it ({first}); "
            f"give a local `path` instead"
        ) from None
