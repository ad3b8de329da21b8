"""Judging a run: sampling, the memorization pass (MQ, 1/3 rule), FID/KID and classifier quality, text-to-image scores,
reports and comparisons. Imports settings/, runs/, data/, training/; any floor above may import it (loops/, the entry
points, the ServerApp's sample grid, the studies, benchmarks).
"""
