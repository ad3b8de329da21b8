"""The AGC skip rule and memory-bank update, against hand-computed values."""

import pytest
import torch

from fl_ietagc.training.agc import MemoryBank, masked_mean


def bank_with(values: dict[int, float], T=10, lam=2.0, decay=0.8) -> MemoryBank:
    bank = MemoryBank(T, lam, decay)
    for t, v in values.items():
        bank.values[t] = v
    return bank


def test_fixed_batch_skip_decisions_loss_and_bank():
    bank = bank_with({1: 1.0, 2: 0.4})  # M[3] = 0
    t = torch.tensor([1, 2, 1, 3, 2])
    losses = torch.tensor([0.4, 0.3, 0.6, 0.1, 0.1], dtype=torch.float64)
    keep = bank.step(losses, t)
    # thresholds M/lambda before the update: t=1 -> 0.5, t=2 -> 0.2, t=3 -> 0.0
    # j0 0.4 < 0.5 skip | j1 0.3 >= 0.2 keep | j2 0.6 >= 0.5 keep (bank read *before* j0's update)
    # j3 0.1 >= 0 keep   | j4 0.1 < 0.2 skip
    assert keep.tolist() == [False, True, True, True, False]
    assert masked_mean(losses, keep).item() == pytest.approx((0.3 + 0.6 + 0.1) / 3, abs=1e-15)
    # sequential updates, skipped samples included, in batch order:
    # M[1]: 1.0 -> 0.8*1.0+0.2*0.4 = 0.88 -> 0.8*0.88+0.2*0.6 = 0.824
    # M[2]: 0.4 -> 0.8*0.4+0.2*0.3 = 0.38 -> 0.8*0.38+0.2*0.1 = 0.324
    # M[3]: 0.0 -> 0.2*0.1 = 0.02
    expected = torch.zeros(10, dtype=torch.float64)
    expected[1], expected[2], expected[3] = 0.824, 0.324, 0.02
    torch.testing.assert_close(bank.values, expected, rtol=0, atol=1e-15)


def test_empty_bank_keeps_everything():
    bank = MemoryBank(10, 2.0, 0.8)
    keep = bank.step(torch.tensor([0.0, 1e-9, 5.0]), torch.tensor([0, 0, 9]))
    assert keep.all()


def test_loss_equal_to_threshold_is_kept():
    bank = bank_with({4: 1.0})
    assert bank.keep_mask(torch.tensor([0.5, 0.49999]), torch.tensor([4, 4])).tolist() == [True, False]


def test_lambda_changes_threshold():
    bank = bank_with({4: 1.0}, lam=3.0)  # threshold 1/3
    assert bank.keep_mask(torch.tensor([0.34, 0.33]), torch.tensor([4, 4])).tolist() == [True, False]


def test_all_skipped_batch_gives_zero_loss_and_zero_gradient_and_still_updates_bank():
    bank = bank_with({5: 10.0})
    w = torch.tensor(1.0, requires_grad=True)
    losses = torch.stack([w * 1.0, w * 2.0])
    keep = bank.step(losses, torch.tensor([5, 5]))
    assert keep.tolist() == [False, False]
    loss = masked_mean(losses, keep)
    loss.backward()
    assert loss.item() == 0.0 and w.grad.item() == 0.0
    # 10 -> 0.8*10+0.2*1 = 8.2 -> 0.8*8.2+0.2*2 = 6.96
    assert bank.values[5].item() == pytest.approx(6.96, abs=1e-12)


def test_masked_mean_gradient_only_through_kept_samples():
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    keep = torch.tensor([True, False, True])
    masked_mean(w * w, keep).backward()
    torch.testing.assert_close(w.grad, torch.tensor([1.0, 0.0, 3.0]))  # d/dw (w0^2 + w2^2)/2


def test_vectorised_update_equals_sequential_loop_with_many_repeats():
    gen = torch.Generator().manual_seed(0)
    bank = MemoryBank(16, 2.0, 0.8)
    ref = torch.zeros(16, dtype=torch.float64)
    for _ in range(20):
        t = torch.randint(0, 16, (128,), generator=gen)  # ~8 samples per slot per batch
        losses = torch.rand(128, generator=gen, dtype=torch.float64)
        expected_keep = torch.tensor([not (loss < ref[tt] / 2.0) for loss, tt in zip(losses, t)])
        for loss, tt in zip(losses, t):
            ref[tt] = 0.8 * ref[tt] + 0.2 * loss
        assert torch.equal(bank.step(losses, t), expected_keep)
        torch.testing.assert_close(bank.values, ref, rtol=1e-12, atol=1e-14)


def test_bank_state_roundtrip_and_size_check():
    bank = bank_with({3: 0.5})
    other = MemoryBank(10, 2.0, 0.8)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.values, bank.values)
    with pytest.raises(ValueError, match="^memory bank has 10 slots, expected 20 "):
        MemoryBank(20).load_state_dict(bank.state_dict())


def test_bank_state_keeps_lambda_and_decay():
    saved = bank_with({3: 0.5}, lam=3.0, decay=0.5).state_dict()
    assert saved["lam"] == 3.0 and saved["decay"] == 0.5
    other = MemoryBank(10, 3.0, 0.5)  # lambda and decay come from the run config; the saved ones are checked
    other.load_state_dict(saved)
    assert (other.lam, other.decay) == (3.0, 0.5)
    assert other.values.dtype == torch.float64 and other.values[3].item() == 0.5
    # lambda 3 decides: threshold 0.5 / 3; decay 0.5 updates: 0.5*0.5 + 0.5*0.2 = 0.35
    assert other.step(torch.tensor([0.17, 0.16, 0.2]), torch.tensor([3, 3, 0])).tolist() == [True, False, True]
    # slot 3: 0.5 -> 0.5*0.5+0.5*0.17 = 0.335 -> 0.5*0.335+0.5*0.16 = 0.2475; slot 0: 0 -> 0.5*0.2 = 0.1
    assert other.values[3].item() == pytest.approx(0.2475, abs=1e-7) and other.values[0].item() == pytest.approx(0.1)


@pytest.mark.parametrize(
    "lam, decay, key, saved, ours",
    [(2.0, 0.8, "agc-lambda", "3.0", "2.0"), (3.0, 0.5, "agc-bank-decay", "0.8", "0.5")],
)
def test_bank_state_lambda_and_decay_are_checked_never_taken(lam, decay, key, saved, ours):
    """The run config is the one source of agc-lambda and agc-bank-decay: a saved bank made with others is refused,
    naming the key, both values and the state file, and the bank is left as it was."""
    state = bank_with({3: 0.5}, lam=3.0, decay=0.8).state_dict()
    bank = MemoryBank(10, lam, decay)
    with pytest.raises(
        ValueError,
        match=rf"^client state s\.pt: its memory bank was made with {key} = {saved}, the run config has {key} = {ours} ",
    ):
        bank.load_state_dict(state, "client state s.pt")
    assert (bank.lam, bank.decay) == (lam, decay) and not bank.values.any()


@pytest.mark.parametrize(
    "lam, decay, message",
    [
        (0.0, 0.8, "agc-lambda must be > 0, got 0.0"),
        (-1.0, 0.8, "agc-lambda must be > 0, got -1.0"),
        (2.0, 1.0, r"agc-bank-decay must be in \[0, 1\), got 1.0"),
        (2.0, -0.1, r"agc-bank-decay must be in \[0, 1\), got -0.1"),
    ],
)
def test_bank_rejects_bad_lambda_and_decay(lam, decay, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        MemoryBank(10, lam, decay)
    state = {"values": torch.zeros(10, dtype=torch.float64), "lam": lam, "decay": decay}
    with pytest.raises(ValueError, match=f"^{message}$"):
        MemoryBank(10).load_state_dict(state)


def test_decay_zero_is_allowed_and_keeps_only_the_last_loss():
    bank = MemoryBank(4, 2.0, 0.0)
    bank.step(torch.tensor([0.3, 0.7]), torch.tensor([1, 1]))
    assert bank.values.tolist() == pytest.approx([0.0, 0.7, 0.0, 0.0], abs=1e-7)
