"""The Flower-free drivers: centralized training and the in-process IET loop (the reference the Flower app is tested
against). Import every wing below; only the entry points (cli.py, validate.py) and experiments/ import them.
"""
