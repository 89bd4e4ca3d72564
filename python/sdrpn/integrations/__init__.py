"""Adapters that let SD-RPN pieces run inside other training frameworks."""
