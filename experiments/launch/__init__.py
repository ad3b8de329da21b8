"""Launch machinery around Flower: flower-simulation's supervised runtime, warm ClientApps, SuperNode polling, the local
SuperLink, following a run. Imports fl_ietagc/ only (strategies/ and clients/ are loaded by Flower).
"""
