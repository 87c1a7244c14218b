"""Every private symbol of another library that qfine touches, one module per library.

Each function says what it reaches and why no public API serves; ``tests/test_compat.py`` pins each
one, so an upgrade that renames or removes it fails there, by name, instead of deep inside a run.
"""
