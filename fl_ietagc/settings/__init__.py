"""Run settings, the floor everything stands on: the typed, checked run-config keys (config.py), the one input error
(errors.py), path and argument checks, cache locations, console behaviour. Imports nothing else of fl_ietagc.
"""
