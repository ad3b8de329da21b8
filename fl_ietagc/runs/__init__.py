"""Run bookkeeping: crash-safe files (checkpoints.py), the run directory and its lifecycle (rundir.py), fault points for
tests, progress lines, phase timing, metrics export. Imports settings/ and federation/.
"""
