"""Architectures, model cards, the bundled zoo and safe weight loading."""
