# Metadata lives in setup.cfg. The native operators are compiled on first use
# (erftool/ops/_native.py), so installing never needs torch in a build environment.
from setuptools import setup

setup()
