"""Turning (prompt, target) pairs into causal-LM training examples with the loss on answer tokens only.

    input_ids = [prompt tokens][target tokens][eos]
    labels    = [  -100 ...   ][target tokens][eos]

Prompts longer than the budget lose their *start* (the question's end and the answer cue stay);
targets longer than theirs are cut at the end.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


def encode_example(prompt: str, target: str, tokenizer: Any, *, max_prompt_tokens: int | None,
                   max_target_tokens: int | None, add_special_tokens: bool = True) -> dict[str, list[int]]:
    """Prompt and target ids with the labels of the target only; a limit of None keeps every token."""
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    if max_prompt_tokens is not None:
        prompt_ids = prompt_ids[-max_prompt_tokens:]  # the end of the prompt, where the question is
    target_ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if max_target_tokens is not None:
        target_ids = target_ids[: max_target_tokens - 1]
    target_ids = target_ids + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + target_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids}


def collate(batch: dict[str, Any] | Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch (Ray Data numpy batch or a list of rows) to its longest example."""
    if isinstance(batch, dict):
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["input_ids"]))]
    else:
        rows = list(batch)
    longest = max(len(r["input_ids"]) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, longest), dtype=torch.long)
    for i, r in enumerate(rows):
        # Ray Data hands read-only arrays; copying into the batch tensors needs no writable view of them
        ids = np.asarray(r["input_ids"], dtype=np.int64)
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(np.asarray(r["labels"], dtype=np.int64))
        attention[i, : len(ids)] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
    if "rank" in rows[0]:
        out["ranks"] = torch.tensor([int(r["rank"]) for r in rows], dtype=torch.long)
    return out
