"""What crosses between the server and its clients: message keys and per-client round records (protocol.py), the flat
weight wire format (wire.py), SecAgg+ fixed-point sums (secure_sum.py). Imports only settings/; no Flower.
"""
