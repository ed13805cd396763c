"""The floor every other folder stands on, importing nothing from tinygpt: atomic writes
(`fileio`), one checker per kind of bad input (`validate`), and the process settings that let
OpenBLAS and numba share the cores (`runtime`)."""
