"""Anti-Gradient Control: the per-timestep memory bank and the skip rule.

The bank M holds one running loss per diffusion timestep, starting at 0. For a batch with
per-sample losses l_j at timesteps t_j:

1. read the bank *before* this step's update and skip sample j iff  l_j < M[t_j] / lambda;
2. the training loss is the mean over kept samples (0, contributing no gradient, if none is kept);
3. then every sample, skipped or not, updates its slot in batch order, one at a time:
   M[t_j] <- d * M[t_j] + (1 - d) * l_j   (d = 0.8 in the paper).

Step 3 is done in closed form so that repeated timesteps need no Python loop: a slot hit by
samples j_1 < ... < j_n in this batch ends at d^n M + (1-d) * sum_i d^(n-i) l_{j_i}, which is the
sequential update exactly (up to float rounding; the bank is kept in float64).
"""

from __future__ import annotations

import torch


class MemoryBank:
    def __init__(self, num_timesteps: int, lam: float = 2.0, decay: float = 0.8, device="cpu"):
        if lam <= 0:
            raise ValueError(f"agc-lambda must be > 0, got {lam}")
        if not 0 <= decay < 1:
            raise ValueError(f"agc-bank-decay must be in [0, 1), got {decay}")
        self.lam = lam
        self.decay = decay
        self.values = torch.zeros(num_timesteps, dtype=torch.float64, device=device)

    def threshold(self, t: torch.Tensor) -> torch.Tensor:
        """M[t_j] / lambda with the bank as it is now (float64)."""
        return self.values[t] / self.lam

    def keep_mask(self, losses: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """True where a sample is kept: not (l_j < M[t_j] / lambda), with the bank as it is now."""
        return ~(losses.detach().double() < self.threshold(t))

    def update(self, losses: torch.Tensor, t: torch.Tensor) -> None:
        """Apply M[t_j] <- d M[t_j] + (1 - d) l_j for every j in batch order."""
        losses = losses.detach().double()
        same = t[:, None] == t[None, :]
        later = torch.triu(same, diagonal=1).sum(1)  # how many later samples hit the same slot
        hits = torch.bincount(t, minlength=self.values.numel()).to(torch.float64)
        contrib = (1 - self.decay) * losses * torch.pow(self.decay, later.double())
        self.values.mul_(torch.pow(torch.tensor(self.decay, dtype=torch.float64, device=self.values.device), hits))
        self.values.index_add_(0, t, contrib)

    def step(self, losses: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Skip decision on the current bank, then the bank update. Returns the keep mask."""
        keep = self.keep_mask(losses, t)
        self.update(losses, t)
        return keep

    def state_dict(self) -> dict:
        # lambda and decay are saved only to be checked on load: the run config is their one source
        return {"values": self.values.cpu(), "lam": self.lam, "decay": self.decay}

    def load_state_dict(self, state: dict, source: str = "saved memory bank") -> None:
        """Take the saved bank's values. Its lambda and decay must be this bank's (the run config's): a resumed
        run keeps its config (settings/config.py check_resumed_config), so a mismatch is an error naming
        `source` (the client state file), never a value to use."""
        if state["values"].numel() != self.values.numel():
            raise ValueError(
                f"memory bank has {state['values'].numel()} slots, expected {self.values.numel()} "
                f"(diffusion-steps changed?)"
            )
        lam, decay = float(state["lam"]), float(state["decay"])
        if lam <= 0:
            raise ValueError(f"agc-lambda must be > 0, got {lam}")
        if not 0 <= decay < 1:
            raise ValueError(f"agc-bank-decay must be in [0, 1), got {decay}")
        for key, saved, ours in (("agc-lambda", lam, self.lam), ("agc-bank-decay", decay, self.decay)):
            if saved != ours:
                raise ValueError(
                    f"{source}: its memory bank was made with {key} = {saved!r}, the run config has "
                    f"{key} = {ours!r} (a resumed run keeps its config)"
                )
        self.values = state["values"].to(device=self.values.device, dtype=torch.float64)


def masked_mean(losses: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of `losses` over kept samples; 0 (with zero gradient) when nothing is kept."""
    return torch.where(keep, losses, torch.zeros_like(losses)).sum() / keep.sum().clamp(min=1)
