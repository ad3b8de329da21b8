"""Training data: datasets in memory (imagesets.py, datasets.py), captions and cached latents for text-to-image, the K
shards and what a shard trains on (shards.py), pixel ranges. Imports settings/ and runs/.
"""
