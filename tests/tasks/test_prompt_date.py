"""Prompts do not change with the calendar: Llama 3.x chat templates write today's date into the system
prompt unless given `date_string`; every prompt is built with the recipe's fixed date instead."""

from __future__ import annotations

import datetime
import shutil

import pytest

from flexi_workflows.errors import ConfigError
from flexi_workflows.models.loading import load_tokenizer
from flexi_workflows.recipes.loader import build
from flexi_workflows.recipes.schema import Recipe
from flexi_workflows.tasks import get_task

# The date logic of Llama-3.2-Instruct's chat template, verbatim in substance.
LLAMA_32_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}"
    "{%- if strftime_now is defined %}{%- set date_string = strftime_now(\"%d %b %Y\") %}"
    "{%- else %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}"
    "{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# A template that reads the clock with no date_string fallback at all.
CLOCK_ONLY_TEMPLATE = "Today is {{ strftime_now('%Y-%m-%d') }}. {{ messages[0]['content'] }}"

ROW = {"question": "What is 2 plus 3?", "context": ""}


class _Clock(datetime.datetime):
    """datetime whose now() is a chosen day: the machine's calendar, moved."""

    day = datetime.datetime(2031, 3, 5, 12, 0)

    @classmethod
    def now(cls, tz=None):
        return cls.day


@pytest.fixture
def set_system_date(monkeypatch):
    import transformers.utils.chat_template_utils as ctu

    def move(day: datetime.datetime) -> None:
        _Clock.day = day
        monkeypatch.setattr(ctu, "datetime", _Clock)

    return move


@pytest.fixture
def llama_tokenizer(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = LLAMA_32_TEMPLATE
    return tokenizer


def test_the_template_really_depends_on_the_system_date(llama_tokenizer, set_system_date):
    set_system_date(datetime.datetime(2031, 3, 5))
    raw = llama_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                              tokenize=False)
    assert "Today Date: 05 Mar 2031" in raw, "the premise: without a pinned date the prompt follows the calendar"


def test_the_prompt_built_today_equals_the_prompt_built_on_another_date(llama_tokenizer, set_system_date):
    task = get_task("math")
    today = task.build_prompt(ROW, llama_tokenizer)
    set_system_date(datetime.datetime(2031, 3, 5))
    later = task.build_prompt(ROW, llama_tokenizer)
    set_system_date(datetime.datetime(1999, 12, 31))
    earlier = task.build_prompt(ROW, llama_tokenizer)
    assert today == later == earlier
    assert today.endswith(
        "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024"
        "\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQuestion: What is 2 plus 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_a_template_that_reads_the_clock_directly_is_pinned_too(llama_tokenizer, set_system_date):
    llama_tokenizer.chat_template = CLOCK_ONLY_TEMPLATE
    set_system_date(datetime.datetime(2031, 3, 5))
    assert get_task("math").build_prompt(ROW, llama_tokenizer) == "Today is 2024-07-26. Question: What is 2 plus 3?"
    assert get_task("math").build_prompt(ROW, llama_tokenizer, date_string="1 Feb 2025").startswith("Today is 2025-02-01.")


def test_the_date_is_a_recipe_setting(tmp_path, tiny_model_dir, llama_tokenizer, set_system_date):
    recipe = build(Recipe, {"task": {"name": "math", "date_string": "1 Jan 2030"}})
    assert recipe.task.date_string == "1 Jan 2030"
    assert build(Recipe, {}).task.date_string == "26 Jul 2024"
    with pytest.raises(ConfigError, match=r"task\.date_string: expected a date like '26 Jul 2024', got '2024-07-26'"):
        build(Recipe, {"task": {"date_string": "2024-07-26"}})

    # the generator that scores and evaluates builds its prompts with the recipe's date
    from flexi_workflows.generation import BatchGenerator

    model_dir = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, model_dir)
    llama_tokenizer.save_pretrained(model_dir)
    set_system_date(datetime.datetime(2031, 3, 5))
    generator = BatchGenerator(str(model_dir), "math", max_new_tokens=2, date_string=recipe.task.date_string)
    (prompt,) = generator.prompts({"id": ["a"], "question": [ROW["question"]], "context": [""]})
    assert "Today Date: 1 Jan 2030\n" in prompt
    assert prompt == get_task("math").build_prompt(ROW, generator.tokenizer, date_string="1 Jan 2030")
