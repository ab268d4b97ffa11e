"""Toy code data, generated from a seed: a pretraining corpus and a "toy HumanEval" fine-tuning task.

Two different kinds of text, as in the paper's setting (a model pretrained on code, then tuned to follow
instructions):

1. The pretraining corpus: small random Python programs (arithmetic functions, loops, list comprehensions).
   It teaches the model Python's syntax and idioms, and no English at all.

2. The fine-tuning task: an instruction in words, written as a docstring, and the function body that does it:

       def f(xs):
           \"\"\"Add 3 to each number, then keep the even numbers, then return their sum.\"\"\"
           xs = [x + 3 for x in xs]
           xs = [x for x in xs if x % 2 == 0]
           return sum(xs)

   Every task chains two of 22 list operations ("primitives", most with a number in them) and ends with one of
   5 ways to return. Its test is a few asserts whose expected values come from running the reference body.

Held-out tasks are new compositions: the ordered pairs of primitives are split three ways (train, val, test),
so a test task applies two primitives that were each seen in training, but never one after the other. To pass,
the model must map each phrase to its line of code and put the lines together, not recall a seen function.
The val split (its own pairs) is the one to look at while choosing anything; the test split is only reported.

A character tokenizer covers both kinds of text with a fixed alphabet, so token ids never depend on the data.
"""

import random
from dataclasses import dataclass


class CharTokenizer:
    """One token per character: newline and the 95 printable ASCII characters (ids 0..95)."""

    def __init__(self):
        self.alphabet = "\n" + "".join(chr(c) for c in range(32, 127))
        self.stoi = {ch: i for i, ch in enumerate(self.alphabet)}

    @property
    def vocab_size(self):
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; ValueError naming the first character outside the alphabet."""
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError as err:
            ch = err.args[0]
            raise ValueError(
                f"character {ch!r} at position {text.index(ch)} is not in the tokenizer's alphabet "
                "(newline and printable ASCII)"
            ) from None

    def decode(self, ids) -> str:
        return "".join(self.alphabet[i] for i in ids)


# ---------------------------------------------------------------------------------------------------------
# The fine-tuning task
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Primitive:
    """One step of a task: an English phrase and the line of code it means, both with an optional {n}."""

    name: str
    phrase: str
    code: str
    n_values: tuple = (None,)  # the numbers {n} can take; (None,) when the step has no number


PRIMITIVES = [
    Primitive("add", "add {n} to each number", "xs = [x + {n} for x in xs]", tuple(range(1, 10))),
    Primitive("sub", "subtract {n} from each number", "xs = [x - {n} for x in xs]", tuple(range(1, 10))),
    Primitive("mul", "multiply each number by {n}", "xs = [x * {n} for x in xs]", tuple(range(2, 10))),
    Primitive("square", "square each number", "xs = [x * x for x in xs]"),
    Primitive("negate", "negate each number", "xs = [-x for x in xs]"),
    Primitive("abs", "take the absolute value of each number", "xs = [abs(x) for x in xs]"),
    Primitive("mod", "take each number modulo {n}", "xs = [x % {n} for x in xs]", tuple(range(2, 10))),
    Primitive("div", "floor-divide each number by {n}", "xs = [x // {n} for x in xs]", tuple(range(2, 10))),
    Primitive("even", "keep the even numbers", "xs = [x for x in xs if x % 2 == 0]"),
    Primitive("odd", "keep the odd numbers", "xs = [x for x in xs if x % 2 == 1]"),
    Primitive("gt", "keep the numbers greater than {n}", "xs = [x for x in xs if x > {n}]", tuple(range(-5, 10))),
    Primitive("lt", "keep the numbers less than {n}", "xs = [x for x in xs if x < {n}]", tuple(range(-5, 10))),
    Primitive("ne", "remove every {n}", "xs = [x for x in xs if x != {n}]", tuple(range(0, 10))),
    Primitive("multiple", "keep the multiples of {n}", "xs = [x for x in xs if x % {n} == 0]", (3, 4, 5)),
    Primitive("sort", "sort the numbers", "xs = sorted(xs)"),
    Primitive("sort_desc", "sort the numbers in descending order", "xs = sorted(xs, reverse=True)"),
    Primitive("reverse", "reverse the list", "xs = xs[::-1]"),
    Primitive("drop", "drop the first {n} numbers", "xs = xs[{n}:]", (1, 2, 3)),
    Primitive("take", "keep the first {n} numbers", "xs = xs[:{n}]", (1, 2, 3, 4, 5)),
    Primitive("dedup", "remove repeated numbers", "xs = list(dict.fromkeys(xs))"),
    Primitive("append", "append {n}", "xs = xs + [{n}]", tuple(range(0, 10))),
    Primitive("prepend", "put {n} in front", "xs = [{n}] + xs", tuple(range(0, 10))),
]

RETURNS = [
    Primitive("list", "return the list", "return xs"),
    Primitive("sum", "return their sum", "return sum(xs)"),
    Primitive("len", "return how many there are", "return len(xs)"),
    Primitive("max", "return the largest or 0", "return max(xs, default=0)"),
    Primitive("min", "return the smallest or 0", "return min(xs, default=0)"),
]


@dataclass(frozen=True)
class Task:
    """One toy-HumanEval problem: the program is `prompt + completion`, checked by the asserts in `test`."""

    prompt: str  # "def f(xs):\n    \"\"\"<instruction>\"\"\"\n"
    completion: str  # the reference body, ending in a blank line (the stop sequence "\n\n")
    test: str  # assert lines that call f
    ops: tuple  # names of the two chained primitives: the composition the splits are made of


@dataclass
class TaskSplits:
    """Tasks from disjoint sets of primitive pairs: fit on train, choose on val, report on test."""

    train: list
    val: list
    test: list


STOP = "\n\n"  # a blank line ends a function, in the corpus and in every task


def _split_pairs(rng, val_frac, test_frac):
    """Shuffle the ordered pairs of distinct primitives and cut them into train, val and test pairs."""
    names = [p.name for p in PRIMITIVES]
    pairs = [(a, b) for a in names for b in names if a != b]
    rng.shuffle(pairs)
    n_test, n_val = round(test_frac * len(pairs)), round(val_frac * len(pairs))
    test, val, train = pairs[:n_test], pairs[n_test : n_test + n_val], pairs[n_test + n_val :]
    for position in (0, 1):  # every primitive must be learnable: seen in training, first and second
        missing = set(names) - {pair[position] for pair in train}
        if missing:
            raise ValueError(f"training pairs never put {sorted(missing)} in position {position}; change the seed")
    return train, val, test


def _random_list(rng):
    n = rng.randint(2, 8)
    pool = [rng.randint(-9, 9) for _ in range(rng.randint(2, n))]  # a small pool, so repeats happen
    return [rng.choice(pool) for _ in range(n)]


def _make_task(rng, pair, n_tests):
    """A task chaining the two named primitives, or None if its asserts could not tell it apart from a
    constant function (e.g. "keep the even numbers, then keep the odd numbers" returns [] whatever xs is)."""
    by_name = {p.name: p for p in PRIMITIVES}
    steps = [by_name[name] for name in pair] + [rng.choice(RETURNS)]
    ns = [rng.choice(step.n_values) for step in steps]
    phrases = [step.phrase.format(n=n) for step, n in zip(steps, ns)]
    instruction = ", then ".join(phrases)
    instruction = instruction[0].upper() + instruction[1:] + "."
    prompt = f'def f(xs):\n    """{instruction}"""\n'
    completion = "".join(f"    {step.code.format(n=n)}\n" for step, n in zip(steps, ns)) + "\n"
    namespace = {}
    exec(prompt + completion, namespace)  # our own generated reference code: trusted, so run in-process
    inputs = [_random_list(rng) for _ in range(n_tests)]
    outputs = [namespace["f"](list(xs)) for xs in inputs]
    if all(out == outputs[0] for out in outputs):
        return None
    test = "".join(f"assert f({xs!r}) == {out!r}\n" for xs, out in zip(inputs, outputs))
    return Task(prompt, completion, test, tuple(pair))


def _sample_tasks(rng, pairs, n, n_tests, exclude_prompts=frozenset()):
    tasks, seen = [], set(exclude_prompts)
    for _ in range(100 * n):  # ample: a few pairs are degenerate, and prompts rarely repeat
        if len(tasks) == n:
            return tasks
        task = _make_task(rng, rng.choice(pairs), n_tests)
        if task is not None and task.prompt not in seen:
            seen.add(task.prompt)
            tasks.append(task)
    raise ValueError(f"could only make {len(tasks)} distinct tasks of the {n} asked from {len(pairs)} pairs")


def make_tasks(seed=0, n_train=5000, n_val=200, n_test=300, n_tests=4, val_frac=0.1, test_frac=0.2):
    """The toy-HumanEval splits. The same seed always gives the same tasks.

    Args:
        seed: seeds the pair split and every sampled task.
        n_train, n_val, n_test: number of distinct tasks in each split.
        n_tests: asserts per task.
        val_frac, test_frac: share of the primitive pairs reserved for val and for test.
    """
    rng = random.Random(seed)
    train_pairs, val_pairs, test_pairs = _split_pairs(rng, val_frac, test_frac)
    return TaskSplits(
        train=_sample_tasks(rng, train_pairs, n_train, n_tests),
        val=_sample_tasks(rng, val_pairs, n_val, n_tests),
        test=_sample_tasks(rng, test_pairs, n_test, n_tests),
    )


# ---------------------------------------------------------------------------------------------------------
# The pretraining corpus
# ---------------------------------------------------------------------------------------------------------

_SCALARS = ["a", "b", "c", "n", "m", "k", "total", "value"]
_LISTS = ["xs", "ys", "nums", "vals", "items", "data"]
_ELEMENTS = ["x", "y", "v", "i", "item"]
_FUNCTIONS = ["f", "g", "h", "helper", "compute", "process", "transform", "combine"]
_DOCSTRINGS = ["Return the result.", "Compute a new value.", "Process the items.", "Build a new list."]


def _num(rng, low=-9, high=9):
    return rng.randint(low, high)


def _literal(rng):
    return repr([_num(rng) for _ in range(rng.randint(1, 6))])


def _map_expr(rng, e):
    """An expression of the element variable e, as a list comprehension would compute it."""
    return rng.choice([f"{e} + {_num(rng, 1, 9)}", f"{e} - {_num(rng, 1, 9)}", f"{e} * {_num(rng, 2, 9)}",
                       f"{e} * {e}", f"-{e}", f"abs({e})", f"{e} % {_num(rng, 2, 9)}", f"{e} // {_num(rng, 2, 9)}"])


def _condition(rng, e):
    return rng.choice([f"{e} > {_num(rng)}", f"{e} < {_num(rng)}", f"{e} % 2 == 0", f"{e} % 2 == 1",
                       f"{e} != {_num(rng, 0, 9)}", f"{e} % {_num(rng, 2, 5)} == 0"])


def _comprehension(rng, e, source):
    expr = _map_expr(rng, e) if rng.random() < 0.6 else e
    cond = f" if {_condition(rng, e)}" if rng.random() < 0.5 or expr == e else ""
    return f"[{expr} for {e} in {source}{cond}]"


def _arithmetic_program(rng):
    fn, (a, b, c) = rng.choice(_FUNCTIONS), rng.sample(_SCALARS, 3)
    op1, op2 = rng.choice("+-*"), rng.choice("+-*")
    return (f"def {fn}({a}, {b}):\n    {c} = {a} {op1} {b}\n    return {c} {op2} {_num(rng, 1, 9)}\n\n"
            f"print({fn}({_num(rng)}, {_num(rng)}))\n")


def _comprehension_program(rng):
    src, dst = rng.sample(_LISTS, 2)
    e = rng.choice(_ELEMENTS)
    reducer = rng.choice(["sum", "len", "sorted", "list"])
    return f"{src} = {_literal(rng)}\n{dst} = {_comprehension(rng, e, src)}\nprint({reducer}({dst}))\n"


def _loop_program(rng):
    acc, e = rng.choice(_SCALARS), rng.choice(_ELEMENTS)
    return (f"{acc} = 0\nfor {e} in {_literal(rng)}:\n    if {_condition(rng, e)}:\n"
            f"        {acc} += {_map_expr(rng, e)}\nprint({acc})\n")


def _list_function_program(rng):
    fn, lst, e = rng.choice(_FUNCTIONS), rng.choice(_LISTS), rng.choice(_ELEMENTS)
    lines = [f"def {fn}({lst}):\n"]
    if rng.random() < 0.3:
        lines.append(f'    """{rng.choice(_DOCSTRINGS)}"""\n')
    for _ in range(rng.randint(1, 3)):
        lines.append(rng.choice([
            f"    {lst} = {_comprehension(rng, e, lst)}\n",
            f"    {lst} = sorted({lst})\n",
            f"    {lst} = sorted({lst}, reverse=True)\n",
            f"    {lst} = {lst}[::-1]\n",
            f"    {lst} = {lst}[{_num(rng, 1, 3)}:]\n",
            f"    {lst} = {lst}[:{_num(rng, 1, 5)}]\n",
            f"    {lst} = {lst} + [{_num(rng, 0, 9)}]\n",
            f"    {lst} = list(dict.fromkeys({lst}))\n",
        ]))
    lines.append(rng.choice([f"    return {lst}\n", f"    return sum({lst})\n", f"    return len({lst})\n",
                             f"    return max({lst}, default=0)\n", f"    return min({lst}, default=0)\n"]))
    return "".join(lines) + f"\nprint({fn}({_literal(rng)}))\n"


def make_corpus(seed=0, n_programs=4000):
    """A pretraining text of `n_programs` small, runnable Python programs, each followed by a blank line."""
    rng = random.Random(seed)
    kinds = [_arithmetic_program, _comprehension_program, _loop_program, _list_function_program]
    return "".join(rng.choice(kinds)(rng) + "\n" for _ in range(n_programs))
