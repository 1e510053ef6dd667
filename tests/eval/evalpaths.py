"""Paths the evaluation tests share (a module of its own: ``conftest`` is a different module in each test folder)."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "recipes", "tiny.toml")
