"""What the root test files share: a float64 fixture, trained-looking adapters, the program every passes() test
judges. pytest loads this file by itself; test files import the plain names from it (`from conftest import
GOOD`), and ask for a fixture by naming it as an argument (`def test_x(float64):`).
"""

import pytest
import torch

import gralora

GOOD = "def f(x):\n    return x + 1\n"  # a correct program ...
TEST = "assert f(1) == 2\nassert f(41) == 42\n"  # ... and the asserts it passes


@pytest.fixture
def float64():
    """float64 as torch's default dtype (the precision in which exactness claims are checked) and
    torch.manual_seed(0), for one test; the previous default dtype is restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


def randomize_B(module, seed=0):
    """Give every adapter in `module` (one layer or a whole model) trained-looking factors: B and hybrid_B,
    zero at the start, drawn from N(0, 1), so dW != 0 and every factor gets a gradient. A is left as
    initialised (random already). Draws from a generator seeded with `seed`, not from torch's global one,
    so the same seed gives the same factors in every process."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gralora.adapter_parameters(module):
            if name.rpartition(".")[2] in ("B", "hybrid_B"):
                p.normal_(generator=generator)
    return module
