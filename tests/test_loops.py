"""The loop cut (auto_model.loops): real looping answers are cut at their first repeat; lists, code,
tables and prose that repeat a word or a short line are not; a streamed answer is cut at the same
place as the whole one, whatever the chunks."""

from __future__ import annotations

import random

import pytest

from auto_model.loops import LoopGuard, cut_loop

# SmolLM2-135M-Instruct's answer to the demo's "How do I keep cut flowers fresh for longer?" (greedy,
# 256 new tokens, vLLM on CPU), as `make demo` printed it before the loop cut.
FLOWERS = (
    "1. **Use a fresh, clean, and well-watered plant** every time you cut a flower. "
    + " ".join(
        f"{i}. **Use a fresh, clean, and well-watered plant** every time you cut a flower." for i in range(2, 12)
    )
    + " 12. **Use a fresh, clean, and well-watered"
)

# Loops of the kinds the embedded models fall into (each from a real greedy answer of SmolLM2 or
# Gemma-3-270M to an everyday request, shortened).
LOOPS = {
    "list item": (
        "Here are some tips:\n\n1. Water the plant once a week.\n2. Keep it in a bright spot.\n"
        "3. Keep it in a bright spot.\n4. Keep it in a bright spot.\n5. Keep it in a bright spot.",
        "Here are some tips:\n\n1. Water the plant once a week.\n2. Keep it in a bright spot.",
    ),
    "sentence": (
        "A heat pump moves heat from the outside air into the house. It works like a fridge in reverse. "
        "It works like a fridge in reverse. It works like a fridge in reverse.",
        "A heat pump moves heat from the outside air into the house. It works like a fridge in reverse.",
    ),
    "long sentence once more": (
        "To save money, plan your meals for the week before you go shopping at the supermarket. "
        "Buy store brands. To save money, plan your meals for the week before you go shopping at the supermarket.",
        "To save money, plan your meals for the week before you go shopping at the supermarket. Buy store brands.",
    ),
    "phrase without punctuation": (
        "The best way to learn is to practice and practice and practice and practice and practice and "
        "practice and practice and practice",
        "The best way to learn is to practice and practice and",
    ),
    # A new label with the same text may be a slip; the third time it is a loop.
    "items with new labels and the same text": (
        "1. Use a tripod: A tripod keeps the camera still and the picture sharp.\n"
        "2. Use a low ISO: A low ISO keeps the noise down in dark scenes.\n"
        "3. **Use a slow shutter**: A tripod keeps the camera still and the picture sharp.\n"
        "4. Use a wide lens: A tripod keeps the camera still and the picture sharp.\n5. Use",
        "1. Use a tripod: A tripod keeps the camera still and the picture sharp.\n"
        "2. Use a low ISO: A low ISO keeps the noise down in dark scenes.\n"
        "3. **Use a slow shutter**: A tripod keeps the camera still and the picture sharp.",
    ),
    "bold items on one line": (
        "1. **Fix leaks in taps and pipes.** 2. **Use a water bottle with a filter to keep cold water in the fridge.** "
        "3. **Use a water bottle with a filter to keep cold water in the fridge.** 4. **Use a water",
        "1. **Fix leaks in taps and pipes.** 2. **Use a water bottle with a filter to keep cold water in the fridge.**",
    ),
    "the same code block again": (
        "Use push:\n\n```javascript\nconst items = [1, 2, 3];\nitems.push(4); // adds 4 at the end\n```\n\n"
        "Or the spread operator:\n\n```javascript\nconst items = [1, 2, 3];\nitems.push(4); // adds 4 at the end\n"
        "```\n\nThat is all.",
        "Use push:\n\n```javascript\nconst items = [1, 2, 3];\nitems.push(4); // adds 4 at the end\n```\n\n"
        "Or the spread operator:",
    ),
    # Short sentences may come back once (a refrain, a reminder): a cycle of them is cut at its third round.
    "cycle of two short sentences": (
        "Rinse the rice in cold water. Cook it for twelve minutes with the lid on. "
        "Rinse the rice in cold water. Cook it for twelve minutes with the lid on. "
        "Rinse the rice in cold water. Cook it for twelve minutes with the lid on.",
        "Rinse the rice in cold water. Cook it for twelve minutes with the lid on. "
        "Rinse the rice in cold water. Cook it for twelve minutes with the lid on.",
    ),
}

# Answers that repeat words, short lines or structure legitimately: never cut.
FINE = {
    "numbered list": (
        "Here is a packing list:\n\n1. A tent and a sleeping bag.\n2. A stove, a pot and a lighter.\n"
        "3. Two litres of water per person per day.\n4. A rain jacket and a warm layer.\n"
        "5. A map, a compass and a charged phone.\n6. A small first-aid kit."
    ),
    "list with a shared opening": (
        "- Use a soft cloth for the screen.\n- Use a soft brush for the keys.\n- Use a dry cloth for the case.\n"
        "- Use compressed air for the vents."
    ),
    "steps that repeat a short instruction": (
        "1. Add one cup of flour. Stir well.\n2. Add one egg. Stir well.\n3. Add the milk. Stir well.\n"
        "4. Pour into the pan."
    ),
    "python": (
        "```python\ndef second_largest(numbers):\n    first = second = None\n    for n in numbers:\n"
        "        if first is None or n > first:\n            first, second = n, first\n"
        "        elif n != first and (second is None or n > second):\n            second = n\n"
        "    return second\n\n\ndef largest(numbers):\n    first = None\n    for n in numbers:\n"
        "        if first is None or n > first:\n            first = n\n    return first\n```"
    ),
    "c loops with the same header": (
        "```c\nfor (int i = 0; i < n; i++) {\n    a[i] = 0;\n}\nfor (int i = 0; i < n; i++) {\n"
        '    a[i] += b[i];\n}\nfor (int i = 0; i < n; i++) {\n    printf("%d\\n", a[i]);\n}\n```'
    ),
    "markdown table": (
        "| Planet | Moons |\n| --- | --- |\n| Mercury | 0 |\n| Venus | 0 |\n| Earth | 1 |\n| Mars | 2 |"
    ),
    "two different code blocks": (
        "```python\nitems = [1, 2, 3]\nitems.append(4)\n```\n\nOr, to add several:\n\n"
        "```python\nitems = [1, 2, 3]\nitems.extend([4, 5])\n```"
    ),
    "labels with short different texts": (
        "- Aloe: easy to care for.\n- Snake plant: easy to care for.\n- Pothos: grows in low light.\n"
        "- Spider plant: safe for cats.\n- Cactus: grows in low light."
    ),
    "counting": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20.",
    "a refrain sung twice": (
        "Row, row, row your boat, gently down the stream.\nMerrily, merrily, merrily, merrily, life is but a dream.\n"
        "Row, row, row your boat, gently down the stream.\nMerrily, merrily, merrily, merrily, life is but a dream."
    ),
}


def test_the_demo_loop_is_cut_at_its_first_repeat():
    text, looped = cut_loop(FLOWERS)
    assert looped
    assert text == "1. **Use a fresh, clean, and well-watered plant** every time you cut a flower."


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_loops_are_cut_where_they_start(name):
    answer, expected = LOOPS[name]
    assert cut_loop(answer) == (expected, True)


@pytest.mark.parametrize("name", sorted(FINE))
def test_lists_code_and_tables_are_not_cut(name):
    assert cut_loop(FINE[name]) == (FINE[name], False)


def test_the_same_lines_outside_a_code_fence_do_loop():
    # The fence is what lets code repeat a line: the same long line in prose is a loop.
    line = "for (int i = 0; i < n; i++) { total = total + values[i] * weights[i]; }"
    assert cut_loop(f"{line}\n{line}\n")[1]
    assert not cut_loop(f"```\n{line}\n{line}\n```")[1]


@pytest.mark.parametrize("text", [FLOWERS, *(a for a, _ in LOOPS.values()), *FINE.values()])
def test_a_stream_is_cut_where_the_whole_answer_is(text):
    rng = random.Random(len(text))
    for _ in range(20):
        guard, shown, i = LoopGuard(), [], 0
        while i < len(text):
            step = rng.choice([1, 1, 2, 3, 5, 8, 40])
            shown.append(guard.feed(text[i : i + step]))
            i += step
            if guard.looped:
                break
        shown.append(guard.flush())
        streamed = "".join(shown)
        whole, looped = cut_loop(text)
        assert guard.looped == looped
        assert streamed.rstrip() == whole
        # nothing shown was ever taken back: the stream's text is a prefix of the answer
        assert text.startswith(streamed)


def test_a_stream_holds_back_only_what_may_become_a_repeat():
    guard = LoopGuard()
    assert guard.feed("Water the plant once a") == "Water the plant once "  # the last word may grow
    assert guard.feed(" week. Water the plant") == "a week. "  # the rest may become the same sentence again
    assert guard.feed(" twice in summer. ") == "Water the plant twice in summer. "
    assert not guard.looped


def test_following_an_engines_decoded_text_reads_only_what_is_new_and_restarts_if_it_changed():
    guard = LoopGuard()
    guard.follow("Keep the vase cool.")
    guard.follow("Keep the vase cool. Kee")
    assert guard.text == "Keep the vase cool. Kee" and not guard.looped
    guard.follow("Keep the vase cold. Keep")  # an earlier token decodes differently now: read anew
    assert guard.text == "Keep the vase cold. Keep"
    guard.follow("Keep the vase cold. Keep the vase cold. More")
    assert guard.looped and guard.answer().rstrip() == "Keep the vase cold."
