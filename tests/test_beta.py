import pytest

from model.beta import BetaConfig, BetaSchedule, GammaConfig


def run(cfg: BetaConfig, epochs: list[tuple[float, float]]) -> list[float]:
    """β used in each epoch, given each epoch's (L_rec, L_KL)."""
    s = BetaSchedule(cfg)
    used = []
    for rec, kl in epochs:
        used.append(s.beta)
        s.observe(rec, kl)
    return [*used, s.beta]


# warm-up 2 epochs, a decision every epoch; hand-worked with a=0.2, b=0.05, w = 1.2, 1.2, 0.9, 1.1:
#  t=2 (5, 2):   first β > 0 epoch, the rule's baseline: L_rec(t') = 5, no decision
#  t=3 (4, 1.5): Δrec = 4 − 6 < 0, Δreg = 1.5 − 2.4 < 0, ΔLrec = ψ(4 − 4.5) + ψ(4 − 5.5) = −2
#                → −(b/4)·2·(1 − 1 − 2) + (a/4)·2·(1 + 1 + 2) = +0.05 + 0.4 → 0.451 (regularisation regime)
#  t=4 (6, 1.4): Δrec = 6 − 4.8 > 0, Δreg = 1.4 − 1.8 < 0, ΔLrec = ψ(6 − 3.6) + ψ(6 − 4.4) = 2
#                → −(b/4)·2·4 = −0.1 → 0.351 (reconstruction regime)
#  t=5 (6, 3):   Δrec > 0, Δreg = 3 − 1.68 > 0, ΔLrec = ψ(6 − 5.4) + ψ(6 − 6.6) = 0 → no change
TABLE = [(10, 5), (8, 5), (5, 2), (4, 1.5), (6, 1.4), (6, 3)]


def test_rule_against_hand_made_table():
    cfg = BetaConfig(warmup=2, interval=1, memory="all")
    assert run(cfg, TABLE) == pytest.approx([0, 0, 0.001, 0.001, 0.451, 0.351, 0.351])


# The same with the default memory (minima over epochs trained with the current β only):
#  t=3 decides as above (history [t=2]) → 0.451; t=4: no epoch has run with 0.451 yet → no decision;
#  t=5 (6, 3): history [t=4] → Δrec = 6 − 7.2 < 0, Δreg = 3 − 1.68 > 0, ΔLrec = ψ(6 − 3.6) + ψ(6 − 4.4) = 2
#              → down term 0 (1 − ψΔreg = 0); up (a/4)·2·(1 − 1 − 2) = −0.2 → 0.251
def test_rule_with_memory_since_change():
    assert run(BetaConfig(warmup=2, interval=1), TABLE) == pytest.approx([0, 0, 0.001, 0.001, 0.451, 0.451, 0.251])


def closed_loop(cfg: BetaConfig, epochs: int) -> list[float]:
    """A toy of what one seed of the paper's data did: a small β reconstructs well (L_rec 2) with a large KL (12);
    β ≥ 0.1 costs reconstruction (3) and buys a small KL (5). Returns β of every epoch."""
    s = BetaSchedule(cfg)
    used = []
    for _ in range(epochs):
        used.append(s.beta)
        s.observe(*((2.0, 12.0) if s.beta < 0.1 else (3.0, 5.0)))
    return used


def test_memory_since_change_stops_the_whole_history_oscillation():
    # Whole history: at a large β, L_rec 3 > 1.2 · 2 (the minimum from small-β epochs) → β ↓; at a small β,
    # L_rec 2 < 0.9 · 3 → β ↑; so β swings between ~0.1 and ~0.25 for ever (seed 1 measured 0.001 ↔ 0.2).
    swings = closed_loop(BetaConfig(warmup=2, interval=2, memory="all"), 80)
    assert max(swings) < 0.3 and min(swings[30:]) < 0.11
    # Minima over the current β's epochs only: the large β is judged against itself, and climbs to the cap.
    climbs = closed_loop(BetaConfig(warmup=2, interval=2), 80)
    assert climbs[-1] == pytest.approx(2.0) and min(climbs[30:]) > 0.1


def test_state_is_explicit_and_records_changes():
    s = BetaSchedule(BetaConfig(warmup=2, interval=1))
    for rec, kl in TABLE:
        s.observe(rec, kl)
    assert s.changes == [3, 5]
    assert (s.t_prime, s.rec_at_change, s.t_prime_index) == (5, 6, 4)
    assert s.rec == [5, 4, 6, 6] and s.kl == [2, 1.5, 1.4, 3]
    again = BetaSchedule.from_dict(s.to_dict())
    assert again == s


def test_decisions_wait_for_the_interval():
    # t=3 is one epoch after the baseline: no decision; t=4 decides (Δrec = 6 − 4.8 > 0, Δreg = 1.4 − 1.8 < 0,
    # ΔLrec against L_rec(t') = 5 is 2) → 0.001 − 0.1 ≤ 0 → reset 0.05; t=5 is again too soon.
    assert run(BetaConfig(warmup=2, interval=2), TABLE) == pytest.approx([0, 0, 0.001, 0.001, 0.001, 0.05, 0.05])


def test_reset_when_rule_goes_to_zero_or_below():
    cfg = BetaConfig(warmup=2, interval=1, start=0.01)
    # t=3 (6.5, 1.4): Δrec = 6.5 − 6 > 0, Δreg < 0, ΔLrec = 2 → −0.1 → 0.01 − 0.1 ≤ 0 → reset 0.05
    assert run(cfg, [(10, 5), (8, 5), (5, 2), (6.5, 1.4)])[-1] == pytest.approx(0.05)


CAP_RUN = [(10, 5), (8, 5), (5, 2), (4, 1.5), (3, 1.0), (6, 0.5)]


def test_cap_clips_and_the_rule_keeps_working():
    # t=3: +0.45 → 2.35 → capped at 2; t=4: +0.45 again, still 2; t=5: Δrec > 0, Δreg < 0, ΔLrec = 2 → −0.1
    assert run(BetaConfig(warmup=2, interval=1, start=1.9), CAP_RUN)[-3:] == pytest.approx([2.0, 2.0, 1.9])


def test_reference_freezes_at_cap():
    s = BetaSchedule(BetaConfig(warmup=2, interval=1, start=1.9, reference=True))
    for rec, kl in CAP_RUN:
        s.observe(rec, kl)
    assert s.frozen and s.beta == 2.0


def test_reference_first_decision_compares_with_warmup_loss():
    # The published code's t' is epoch 0 (β = 0): the very first β > 0 epoch already sees ΔLrec = −2 and jumps.
    ref = run(BetaConfig(warmup=2, interval=1, reference=True), TABLE[:3])
    assert ref[-1] == pytest.approx(0.451)
    assert run(BetaConfig(warmup=2, interval=1), TABLE[:3])[-1] == pytest.approx(0.001)


def test_vanilla_and_fixed():
    assert run(BetaConfig(mode="vanilla", warmup=2), TABLE[:4]) == [0, 0, 1, 1, 1]
    assert run(BetaConfig(mode="fixed", fixed=0.3, warmup=0), TABLE[:2]) == [0.3, 0.3, 0.3]


def test_bad_config_names_the_value():
    with pytest.raises(ValueError, match="mode must be one of"):
        BetaConfig(mode="cyclic")


def test_gamma_cycles_between_low_and_high():
    assert [GammaConfig().at(e) for e in (0, 49, 50, 100, 999)] == [0, 0, 2.0, 2.0, 2.0]  # the default is steady
    g = GammaConfig.paper()
    assert [g.at(e) for e in (0, 49, 50, 99, 100, 199, 200, 300, 999)] == [0, 0, 0.01, 0.01, 0.2, 0.2, 0.01, 0.2, 0.2]
