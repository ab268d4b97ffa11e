"""The study beside the core: the evidence behind the README's claims (see study/README.md).

Nothing in the core (gralora.py, tiny_gpt/, tutorial.ipynb) imports from here.
"""
