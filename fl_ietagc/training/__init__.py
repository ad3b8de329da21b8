"""One client's training: the UNet of a run and its initial weights, the diffusion loss, the AGC memory bank (agc.py), the
local loop (trainer.py), RET, LoRA, precision, client-side DP. Imports settings/, federation/, runs/, data/.
"""
