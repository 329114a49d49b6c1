"""Shared library of the Cosmos-Predict2 Text2Image post-training kit.

One concern per module; the scripts at the repository root import from here and never from each other.
"""
