"""setup.py: the place where the nvcc build of csrc/ goes; for now a pure-Python install."""
from setuptools import setup

setup()
