"""Toy code data, generated from a seed: a pretraining corpus and a "toy HumanEval" fine-tuning task.

Both chain the same 22 list operations ("primitives", most with a number in them) and 5 ways to return, each
known three ways: as a line of code (`xs = [x + 3 for x in xs]`), in a terse step notation (`[x + 3]`) and as an
English phrase ("add 3 to each number").

1. The pretraining corpus: small random Python programs (arithmetic, loops, list comprehensions), and functions
   that chain primitives under a docstring in step notation (`[v + 3] [? v % 2 == 0] -> sum`). So the base
   model knows Python and how to turn a list of steps into lines, but no English.
2. The fine-tuning task (instruction -> function body, like HumanEval): the same kind of function, asked for in
   English ("Add 3 to each number, then keep the even numbers, then return their sum."). Each task chains two
   primitives and a return; its test is asserts whose expected values come from running the reference body.
   Fine-tuning must teach what 27 English phrases (with their numbers) mean: a real update, as the base
   model's near-zero pass@1 shows, and a many-entry mapping, where a tiny rank can fall short.

Held-out tasks are new compositions: the ordered pairs of primitives are split into train, val and test, and a
test task chains two primitives each seen in training but never one after the other as two steps, neither in the
tasks nor in the corpus's step-by-step programs (its one-line comprehensions may fuse a test pair's filter and
map). Choose anything on val; only report test. A character tokenizer with a fixed alphabet covers both texts.
"""

import collections
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
            raise ValueError(f"character {ch!r} at position {text.index(ch)} is not in the tokenizer's alphabet "
                             "(newline and printable ASCII)") from None

    def decode(self, ids) -> str:
        return "".join(self.alphabet[i] for i in ids)


@dataclass(frozen=True)
class Primitive:
    """One step: its line of code, step notation and English phrase. Templates use {xs} (the list), {x} (an
    element) and {n} (the step's number, drawn from n_values; (None,) when the step has no number)."""

    name: str
    code: str
    notation: str
    phrase: str
    n_values: tuple = (None,)  # or a range


_p = Primitive  # short, for the tables below
PRIMITIVES = [
    _p("add", "{xs} = [{x} + {n} for {x} in {xs}]", "[{x} + {n}]", "add {n} to each number", range(1, 10)),
    _p("sub", "{xs} = [{x} - {n} for {x} in {xs}]", "[{x} - {n}]", "subtract {n} from each number", range(1, 10)),
    _p("mul", "{xs} = [{x} * {n} for {x} in {xs}]", "[{x} * {n}]", "multiply each number by {n}", range(2, 10)),
    _p("square", "{xs} = [{x} * {x} for {x} in {xs}]", "[{x} * {x}]", "square each number"),
    _p("negate", "{xs} = [-{x} for {x} in {xs}]", "[-{x}]", "negate each number"),
    _p("abs", "{xs} = [abs({x}) for {x} in {xs}]", "[abs({x})]", "take the absolute value of each number"),
    _p("mod", "{xs} = [{x} % {n} for {x} in {xs}]", "[{x} % {n}]", "take each number modulo {n}", range(2, 10)),
    _p("div", "{xs} = [{x} // {n} for {x} in {xs}]", "[{x} // {n}]", "floor-divide each number by {n}", range(2, 10)),
    _p("even", "{xs} = [{x} for {x} in {xs} if {x} % 2 == 0]", "[? {x} % 2 == 0]", "keep the even numbers"),
    _p("odd", "{xs} = [{x} for {x} in {xs} if {x} % 2 == 1]", "[? {x} % 2 == 1]", "keep the odd numbers"),
    _p("gt", "{xs} = [{x} for {x} in {xs} if {x} > {n}]", "[? {x} > {n}]", "keep the numbers greater than {n}",
       range(-5, 10)),
    _p("lt", "{xs} = [{x} for {x} in {xs} if {x} < {n}]", "[? {x} < {n}]", "keep the numbers less than {n}",
       range(-5, 10)),
    _p("ne", "{xs} = [{x} for {x} in {xs} if {x} != {n}]", "[? {x} != {n}]", "remove every {n}", range(0, 10)),
    _p("multiple", "{xs} = [{x} for {x} in {xs} if {x} % {n} == 0]", "[? {x} % {n} == 0]",
       "keep the multiples of {n}", (3, 4, 5)),
    _p("sort", "{xs} = sorted({xs})", "[sorted]", "sort the numbers"),
    _p("sort_desc", "{xs} = sorted({xs}, reverse=True)", "[sorted, reverse]", "sort the numbers in descending order"),
    _p("reverse", "{xs} = {xs}[::-1]", "[::-1]", "reverse the list"),
    _p("drop", "{xs} = {xs}[{n}:]", "[{n}:]", "drop the first {n} numbers", (1, 2, 3)),
    _p("take", "{xs} = {xs}[:{n}]", "[:{n}]", "keep the first {n} numbers", (1, 2, 3, 4, 5)),
    _p("dedup", "{xs} = list(dict.fromkeys({xs}))", "[unique]", "remove repeated numbers"),
    _p("append", "{xs} = {xs} + [{n}]", "[+ {n}]", "append {n}", range(0, 10)),
    _p("prepend", "{xs} = [{n}] + {xs}", "[{n} +]", "put {n} in front", range(0, 10)),
]

RETURNS = [
    _p("list", "return {xs}", "-> list", "return the list"),
    _p("sum", "return sum({xs})", "-> sum", "return their sum"),
    _p("len", "return len({xs})", "-> len", "return how many there are"),
    _p("max", "return max({xs}, default=0)", "-> max", "return the largest or 0"),
    _p("min", "return min({xs}, default=0)", "-> min", "return the smallest or 0"),
]

_BY_NAME = {p.name: p for p in PRIMITIVES}
STOP = "\n\n"  # a blank line ends a function, in the corpus and in every task


def split_pairs(seed, val_frac=0.1, test_frac=0.2):
    """The ordered pairs of distinct primitives, shuffled by `seed` and cut into (train, val, test) lists. Corpus
    and tasks made with the same seed use the same cut, so a val or test pair appears in neither."""
    pairs = [(a.name, b.name) for a in PRIMITIVES for b in PRIMITIVES if a is not b]
    random.Random(seed).shuffle(pairs)
    n_test, n_val = round(test_frac * len(pairs)), round(val_frac * len(pairs))
    test, val, train = pairs[:n_test], pairs[n_test : n_test + n_val], pairs[n_test + n_val :]
    for position in (0, 1):  # every primitive must be learnable: seen in training, first and second
        missing = {p.name for p in PRIMITIVES} - {pair[position] for pair in train}
        if missing:
            raise ValueError(f"seed={seed}: training pairs never put {sorted(missing)} in position {position}")
    return train, val, test


def _chain(rng, steps, xs, x):
    """Code lines, notations and phrases of `steps` (Primitives), with random numbers filled in."""
    filled = []
    for step in steps:
        n = rng.choice(step.n_values)
        filled.append((step.code.format(xs=xs, x=x, n=n), step.notation.format(xs=xs, x=x, n=n),
                       step.phrase.format(n=n)))
    return filled


@dataclass(frozen=True)
class Task:
    """One toy-HumanEval problem: the program is `prompt + completion`, checked by the asserts in `test`."""

    prompt: str  # "def f(xs):\n    \"\"\"<instruction>\"\"\"\n"
    completion: str  # the reference body, ending in a blank line (the stop sequence "\n\n")
    test: str  # assert lines that call f
    ops: tuple  # names of the two chained primitives: the composition the splits are made of


# Tasks from disjoint sets of primitive pairs: fit on train, choose on val, report on test.
TaskSplits = collections.namedtuple("TaskSplits", ["train", "val", "test"])


def _random_list(rng):
    n = rng.randint(2, 8)
    pool = [rng.randint(-9, 9) for _ in range(rng.randint(2, n))]  # a small pool, so repeats happen
    return [rng.choice(pool) for _ in range(n)]


def _make_task(rng, pair, n_tests):
    """A task chaining the two named primitives and a random return, or None if its asserts could not tell
    it from a constant function (e.g. "keep the even numbers, then keep the odd numbers")."""
    steps = _chain(rng, [_BY_NAME[pair[0]], _BY_NAME[pair[1]], rng.choice(RETURNS)], "xs", "x")
    instruction = ", then ".join(phrase for _, _, phrase in steps)
    prompt = f'def f(xs):\n    """{instruction[0].upper() + instruction[1:]}."""\n'
    completion = "".join(f"    {code}\n" for code, _, _ in steps) + "\n"
    namespace = {}
    exec(prompt + completion, namespace)  # our own generated reference code: trusted, so run in-process
    inputs = [_random_list(rng) for _ in range(n_tests)]
    outputs = [namespace["f"](list(xs)) for xs in inputs]
    if all(out == outputs[0] for out in outputs):
        return None
    test = "".join(f"assert f({xs!r}) == {out!r}\n" for xs, out in zip(inputs, outputs))
    return Task(prompt, completion, test, tuple(pair))


def _sample_tasks(rng, pairs, n, n_tests):
    tasks, seen = [], set()
    for _ in range(100 * n):  # ample: a few pairs are degenerate, and prompts rarely repeat
        if len(tasks) == n:
            return tasks
        task = _make_task(rng, rng.choice(pairs), n_tests)
        if task is not None and task.prompt not in seen:
            seen.add(task.prompt)
            tasks.append(task)
    raise ValueError(f"could only make {len(tasks)} distinct tasks of the {n} asked from {len(pairs)} pairs")


def make_tasks(seed=0, n_train=5000, n_val=200, n_test=300, n_tests=6):
    """The toy-HumanEval splits. The same seed always gives the same tasks.

    Args:
        seed: seeds the pair split (see split_pairs) and every sampled task.
        n_train, n_val, n_test: number of distinct tasks in each split.
        n_tests: asserts per task.
    """
    train_pairs, val_pairs, test_pairs = split_pairs(seed)
    rng = random.Random(seed)
    return TaskSplits(
        train=_sample_tasks(rng, train_pairs, n_train, n_tests),
        val=_sample_tasks(rng, val_pairs, n_val, n_tests),
        test=_sample_tasks(rng, test_pairs, n_test, n_tests),
    )


# The pretraining corpus (make_corpus, at the end): the names its programs use.
_SCALARS = ["a", "b", "c", "n", "m", "k", "total", "value"]
_LISTS = ["xs", "ys", "nums", "vals", "items", "data"]
_ELEMENTS = ["x", "y", "v", "i", "item"]
_FUNCTIONS = ["f", "g", "h", "helper", "compute", "process", "transform", "combine"]


def _num(rng, low=-9, high=9):
    return rng.randint(low, high)


def _literal(rng):
    return repr([_num(rng) for _ in range(rng.randint(1, 6))])


def _arithmetic_program(rng):
    fn, (a, b, c) = rng.choice(_FUNCTIONS), rng.sample(_SCALARS, 3)
    op1, op2 = rng.choice("+-*"), rng.choice("+-*")
    return (f"def {fn}({a}, {b}):\n    {c} = {a} {op1} {b}\n    return {c} {op2} {_num(rng, 1, 9)}\n\n"
            f"print({fn}({_num(rng)}, {_num(rng)}))\n")


def _comprehension_program(rng):
    """A list comprehension outside any function: one map and/or one filter step, fused."""
    src, dst = rng.sample(_LISTS, 2)
    e = rng.choice(_ELEMENTS)
    expr = rng.choice([f"{e} + {_num(rng, 1, 9)}", f"{e} * {_num(rng, 2, 9)}", f"{e} * {e}", f"abs({e})", e])
    cond = rng.choice([f" if {e} > {_num(rng)}", f" if {e} % 2 == 0", f" if {e} != {_num(rng, 0, 9)}", ""])
    reducer = rng.choice(["sum", "len", "sorted", "list"])
    return f"{src} = {_literal(rng)}\n{dst} = [{expr} for {e} in {src}{cond}]\nprint({reducer}({dst}))\n"


def _loop_program(rng):
    acc, e = rng.choice(_SCALARS), rng.choice(_ELEMENTS)
    return (f"{acc} = 0\nfor {e} in {_literal(rng)}:\n    if {e} % {_num(rng, 2, 5)} == 0:\n"
            f"        {acc} += {e} * {_num(rng, 1, 9)}\nprint({acc})\n")


def _steps_program(rng, successors):
    """A function chaining 1 to 3 primitives (each next one a training successor) and a return, under a
    docstring in step notation."""
    fn, xs, x = rng.choice(_FUNCTIONS), rng.choice(_LISTS), rng.choice(_ELEMENTS)
    steps = [rng.choice(PRIMITIVES)]
    for _ in range(rng.randint(0, 2)):
        steps.append(_BY_NAME[rng.choice(successors[steps[-1].name])])
    filled = _chain(rng, steps + [rng.choice(RETURNS)], xs, x)
    doc = " ".join(notation for _, notation, _ in filled)
    body = "".join(f"    {code}\n" for code, _, _ in filled)
    return f'def {fn}({xs}):\n    """{doc}"""\n{body}\nprint({fn}({_literal(rng)}))\n'


def make_corpus(seed=0, n_programs=4000):
    """A pretraining text of `n_programs` small, runnable Python programs, each followed by a blank line. Half
    are step-notation functions, whose consecutive steps are always a training pair of split_pairs(seed)."""
    train_pairs, _, _ = split_pairs(seed)
    successors = {}
    for a, b in train_pairs:
        successors.setdefault(a, []).append(b)
    rng = random.Random(seed)
    others = [_arithmetic_program, _comprehension_program, _loop_program]
    programs = [_steps_program(rng, successors) if rng.random() < 0.5 else rng.choice(others)(rng)
                for _ in range(n_programs)]
    return "".join(program + "\n" for program in programs)
