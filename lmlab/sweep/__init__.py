"""Sweeps: grid expansion and run ids (grid.py), backends that run them (backends.py), results tables (collect.py)."""
