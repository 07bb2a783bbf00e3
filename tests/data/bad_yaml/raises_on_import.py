"""Corpus helper: a user module whose import fails (the config must report it, not crash)."""
raise RuntimeError("this module fails on import on purpose")
