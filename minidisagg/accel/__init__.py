"""Opt-in accelerators: the model's code rewritten in another form for speed, off by default.

The engine's default on every device runs ``models/llama.py`` itself, whose dispatch points pick
their kernels (Triton on a GPU, native C++ ops on a CPU). An accelerator here instead replaces a
whole step with a copy of the model (``native_decode.py``: a CPU decode step in C++). It is tested
bit for bit against the model, and refuses to run, saying why, when the model is not the stock one
(``stock.py``), so that changing the model always changes what the engine computes.
"""
