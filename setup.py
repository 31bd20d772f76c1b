"""The one compiled module; everything else about the package is in pyproject.toml.

``fraudactors.features._kernel`` is the user-window block of the feature vector in C: the per-event
loops of the feature definition, bit for bit the Python definition's arithmetic
(tests/features/test_kernel.py). ``-ffp-contract=off``: no fused multiply-add, which would round
differently from Python. (setuptools' ``ext-modules`` table in pyproject.toml is still experimental.)
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fraudactors.features._kernel",
            sources=["fraudactors/features/_kernel.c"],
            extra_compile_args=["-ffp-contract=off"],
        )
    ]
)
