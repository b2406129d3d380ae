"""The main job's output (scripts/demo.py): the same columns, prompts and decoding against the session's steer
server (the default model with the shipped steers loaded under the same names): no continuation repeats a
word more than three times in a row, each steer at each value changes the text, and one batch carrying every
column answers what each column answers alone."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

from helpers import SHIPPED_STEERS

DEMO_PATH = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"
_spec = importlib.util.spec_from_file_location("demo", DEMO_PATH)
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


def test_repeated_word_run_counts_the_longest_run():
    assert demo.repeated_word_run("") == 0
    assert demo.repeated_word_run("a b c") == 1
    assert demo.repeated_word_run("slow, slow. Slow slow and slow") == 4


def test_the_demo_columns_read_as_text_and_show_each_steer(servers):
    assert set(demo.shipped_steers()) == set(SHIPPED_STEERS)
    cols = demo.columns(list(SHIPPED_STEERS))
    jobs = [(p, x) for p in demo.PROMPTS for _, x in cols]
    texts = asyncio.run(demo.generate_all(servers["steer"].url, jobs))
    worst = max(texts, key=demo.repeated_word_run)
    assert demo.repeated_word_run(worst) <= demo.LONGEST_RUN, worst
    by_prompt = [texts[i:i + len(cols)] for i in range(0, len(texts), len(cols))]
    for row in by_prompt:
        assert all(text != row[0] for text in row[1:]), row  # every steered column differs from unsteered
    alone = asyncio.run(demo.generate_all(servers["steer"].url, jobs[:len(cols)][-1:]))
    assert alone == by_prompt[0][-1:]
