"""The Flower-free drivers: centralized training and the in-process IET loop (the reference the Flower app is tested
against). Import every wing below; fl_ietagc/cli.py, experiments/studies/ and benchmarks/ import them.
"""
