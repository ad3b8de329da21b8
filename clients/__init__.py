"""The ClientApp: one Flower client per shard, training with fl_ietagc's trainer and answering in its wire format,
with the SecAgg+ and DP mods. Imports fl_ietagc/ only; Flower loads it (pyproject's clientapp)."""
