"""Token limits: a number ≥ 1, or an explicit `null` for none — never 0 meaning "no truncation" by accident."""

from __future__ import annotations

import pytest

from flexi_workflows.data.causal_lm import encode_example
from flexi_workflows.errors import ConfigError
from flexi_workflows.memory import plan_recipe
from flexi_workflows.models.loading import load_tokenizer
from flexi_workflows.router.pooling import load_input_embeddings, pool_texts
from tests.helpers import small_recipe


def test_null_keeps_every_token_and_a_number_cuts(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt, target = "The apple has 1 plus 2? " * 20, "1+2=3. #### 3 " * 10
    full = encode_example(prompt, target, tokenizer, max_prompt_tokens=None, max_target_tokens=None)
    cut = encode_example(prompt, target, tokenizer, max_prompt_tokens=8, max_target_tokens=4)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    n_target = len(tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])
    assert len(full["input_ids"]) == n_prompt + n_target + 1  # + end of sequence
    assert len(cut["input_ids"]) == 8 + 4
    assert full["input_ids"][n_prompt - 8:n_prompt] == cut["input_ids"][:8]  # the prompt keeps its end

    embedding = load_input_embeddings(tiny_model_dir)
    whole = pool_texts([prompt], load_tokenizer(tiny_model_dir, padding_side="right"), embedding, max_length=None)
    short = pool_texts([prompt], load_tokenizer(tiny_model_dir, padding_side="right"), embedding, max_length=8)
    assert not whole.allclose(short)


def test_null_is_accepted_zero_is_not_and_the_plan_counts_the_whole_context(tmp_path, tiny_model_dir):
    recipe = small_recipe(tmp_path, tiny_model_dir, overrides=["task.max_prompt_tokens=null", "task.max_target_tokens=null"])
    assert recipe.task.max_prompt_tokens is None and recipe.task.max_target_tokens is None
    with pytest.raises(ConfigError, match="task.max_prompt_tokens must be ≥ 1, got 0"):
        small_recipe(tmp_path, tiny_model_dir, overrides=["task.max_prompt_tokens=0"])
    limited = plan_recipe(small_recipe(tmp_path, tiny_model_dir), gpu_memory=None, gpu_memory_source="none")
    unlimited = plan_recipe(recipe, gpu_memory=None, gpu_memory_source="none")
    assert unlimited.seq_len > limited.seq_len == 64 + 24
