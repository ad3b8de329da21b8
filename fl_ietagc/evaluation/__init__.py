"""Judging a run: sampling, the memorization pass (MQ, 1/3 rule), FID/KID and classifier quality, text-to-image scores,
reports and comparisons. Imports every wing below it; only loops/ and the entry points import it.
"""
