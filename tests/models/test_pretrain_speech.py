"""The tiny Whisper's record of itself (evaluate_speech_base), measured when it is installed on first use."""

from __future__ import annotations

import logging

from flexi_workflows.models.notices import GenerateNotices
from flexi_workflows.models.pretrain_speech import evaluate_speech_base
from tests.conftest import REPO_ROOT
from tests.helpers import WarningsSeen
from tests.tasks.test_speech import write_librispeech


def test_measuring_the_installed_whisper_prints_none_of_transformers_notices_about_its_own_calls(tmp_path):
    """A newcomer's first speech quickstart installs the tiny Whisper and measures it: that measurement's
    generate() calls printed the same transformers notices the pipeline's generation drops (GenerateNotices)."""
    write_librispeech(tmp_path / "LibriSpeech")
    (model_dir,) = (REPO_ROOT / "flexi_workflows" / "assets" / "builtin_models").glob("whisper-tiny-spoken-*")
    generation_logger, seen = logging.getLogger("transformers.generation.utils"), WarningsSeen()
    installed = [f for f in generation_logger.filters if isinstance(f, GenerateNotices)]  # by an earlier test
    for f in installed:
        generation_logger.removeFilter(f)
    generation_logger.addHandler(seen)
    try:
        record = evaluate_speech_base(model_dir, tmp_path, ("test-clean", "test-other"))
    finally:
        generation_logger.removeHandler(seen)
        for f in installed:
            generation_logger.addFilter(f)
    assert record["rows"] == {"test-clean": 2, "test-other": 1}
    assert {"wer_clean", "wer_other", "wer_all"} <= set(record)
    assert seen.messages == [], seen.messages
