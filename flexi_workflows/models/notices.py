"""transformers' generate() notices that describe its own calls, never the user's settings."""

from __future__ import annotations

import logging


class GenerateNotices(logging.Filter):
    """Drops transformers' generate() notices that describe its own calls, never the recipe's: the recipe's
    max_new_tokens always wins over a model's max_length (and Whisper's generate sets max_length itself);
    Whisper's generate passes suppress_tokens beside its generation config; and no Whisper input has padding
    an attention mask would mark (features fill a fixed window; the decoder starts from its prompt). Each
    came once per actor or once per batch on every speech run's console (transformers 5.24)."""

    NOTICES = ("Both `max_new_tokens`", "Passing `generation_config` together with generation-related",
               "The attention mask is not set with a batched input")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES)


def quiet_generate_notices() -> None:
    """Installs GenerateNotices on transformers' generation logger, once per process."""
    generation_logger = logging.getLogger("transformers.generation.utils")
    if not any(isinstance(f, GenerateNotices) for f in generation_logger.filters):
        generation_logger.addFilter(GenerateNotices())
