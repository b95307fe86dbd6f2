"""Next sample's policy (qunet.policy) on hand-made records: phases, the paper's pick, holds, stop signal, budget."""

import pytest

from qunet.config import SelectionConfig
from qunet.policy import (DISAGREEMENT, INITIAL, SCORING, VARIANTS, LoopState, VolumeState, agreement, budget_q0,
                          choose, rescore_order)

MODEL = LoopState(has_model=True)


def test_initial_phase_serves_s0_volume_by_volume_skipping_annotated_and_held():
    volumes = [VolumeState("b", initial=[4, 0]), VolumeState("a", initial=[5, 2, 7], annotated={5}, held={2})]
    pick = choose(volumes, LoopState(), SelectionConfig(slices_per_sample=2))
    assert (pick.phase, pick.image_id, pick.slices, pick.scores) == (INITIAL, "a", [7], [2.0])  # id order, S0 rank
    done = [VolumeState("a", initial=[1], annotated={1}), VolumeState("b", initial=[3], held={3})]
    empty = choose(done, LoopState())
    assert empty.image_id is None and not empty.slices and empty.stop is None and "train a model" in empty.message


def test_disagreement_phase_serves_the_volume_with_the_lowest_q_lowest_first():
    volumes = [VolumeState("a", q=[0.3, 0.9, 0.05, 0.2], annotated={2}),  # 0.05 is annotated: not open
               VolumeState("b", q=[0.1, 0.45, None, 0.6, 0.49], held={0})]  # 0.1 is held by another client
    pick = choose(volumes, MODEL, SelectionConfig(q0=0.5, slices_per_sample=2))
    assert (pick.phase, pick.image_id, pick.slices, pick.scores) == (DISAGREEMENT, "a", [3, 0], [0.2, 0.3])
    assert pick.below_q0 == 5 and pick.stop is None and pick.q0 == 0.5
    unheld = choose([volumes[0], VolumeState("b", q=volumes[1].q)], MODEL, SelectionConfig(q0=0.5, slices_per_sample=2))
    assert (unheld.image_id, unheld.slices) == ("b", [0, 1])


def test_scoring_phase_until_a_rescored_volume_has_a_slice_below_q0():
    s0 = {"initial": [2, 1]}
    waiting = [VolumeState("a", **s0), VolumeState("b", **s0, q=[0.9, 0.8, 0.95])]  # a: not scored by this model yet
    pick = choose(waiting, MODEL)
    assert (pick.phase, pick.pending, pick.image_id, pick.slices) == (SCORING, 1, "a", [2, 1])  # S0 meanwhile
    assert pick.stop is None  # nothing below q0 yet, but a is still to be scored
    nothing_open = [VolumeState("a", initial=[1], annotated={1}), VolumeState("b", q=[0.9, 0.8, 0.95])]
    empty = choose(nothing_open, MODEL)
    assert empty.phase == SCORING and empty.image_id is None and "1 volume(s) to go" in empty.message
    ready = [VolumeState("a", **s0), VolumeState("b", **s0, q=[0.9, 0.2, 0.95])]
    early = choose(ready, MODEL)  # b is re-scored and has a slice below q0: served while a is scored
    assert (early.phase, early.image_id, early.slices, early.pending) == (DISAGREEMENT, "b", [1], 1)
    unscorable = choose([VolumeState("a", unscorable=True), waiting[1]], MODEL)
    assert unscorable.pending == 0 and unscorable.stop.reason == "no_slice_below_q0"


def test_stop_when_no_unannotated_slice_is_below_q0():
    volumes = [VolumeState("a", q=[0.2, 0.7], annotated={0}), VolumeState("b", q=[0.9, 1.0])]
    pick = choose(volumes, MODEL, SelectionConfig(q0=0.5))
    assert pick.image_id is None and pick.stop.reason == "no_slice_below_q0" and pick.message == pick.stop.message
    assert choose(volumes, MODEL, SelectionConfig(q0=0.8)).slices == [1]  # a higher q0 still finds one


def test_stop_when_agreement_flattened_still_serves_slices():
    volumes = [VolumeState("a", q=[0.2, 0.7])]
    flat = choose(volumes, LoopState(True, agreement=[0.3, 0.61, 0.615]), SelectionConfig(stop_tolerance=0.01))
    assert flat.stop.reason == "agreement_flattened" and flat.slices == [0]
    assert choose(volumes, LoopState(True, agreement=[0.5, 0.61]), SelectionConfig(stop_tolerance=0.01)).stop is None
    assert choose(volumes, LoopState(True, agreement=[0.61, 0.61]), SelectionConfig(stop_tolerance=0)).stop is None
    assert choose(volumes, LoopState(True, agreement=[0.61]), SelectionConfig()).stop is None  # one model: no trend
    assert agreement([1.0, 0.2, 0.4, 1.0, 0.9]) == 0.4  # slices with Q = 1 (both heads empty) left out
    assert agreement([1.0, 1.0]) is None


def test_budget_lowers_q0_and_caps_the_answer():
    volumes = [VolumeState("a", q=[0.1, 0.2, 0.3, 0.4], annotated={3}), VolumeState("b", q=[0.15, 0.9], held={1})]
    pick = choose(volumes, MODEL, SelectionConfig(q0=0.5, budget=4, slices_per_sample=10))
    # spent: 1 annotated + 1 held = 2, so 2 left: q0 drops to the 3rd lowest open Q (0.2), leaving 0.1 and 0.15
    assert pick.remaining == 2 and pick.q0 == 0.2 and pick.below_q0 == 2
    assert (pick.image_id, pick.slices) == ("a", [0])
    assert budget_q0([0.1, 0.2, 0.3], 0.5, None) == 0.5 and budget_q0([0.1, 0.6], 0.5, 1) == 0.5
    spent = choose(volumes, MODEL, SelectionConfig(budget=2))
    assert spent.stop.reason == "budget_spent" and spent.image_id is None and spent.remaining == 0
    before_model = choose([VolumeState("a", initial=[0, 1, 2])], LoopState(), SelectionConfig(budget=2))
    assert before_model.slices == [0, 1] and before_model.remaining == 2


def test_rescore_order_puts_volumes_never_scored_first_then_lowest_open_q():
    volumes = [VolumeState("a", q=[0.9, 0.05], annotated={1}), VolumeState("b", q=[0.3, 0.7]), VolumeState("c"),
               VolumeState("d", q=[0.1])]
    assert rescore_order(volumes) == ["c", "d", "b", "a"]  # a's 0.05 is annotated: its lowest open Q is 0.9


def test_variant_is_a_setting():
    assert set(VARIANTS) >= {"paper", "spread"} and SelectionConfig().pick == "paper"
    with pytest.raises(KeyError):
        choose([], LoopState(), SelectionConfig(pick="no-such-variant"))


def test_ranked_slices_give_the_same_pick_as_q_alone():
    """`ranked` (what the app's scoring run stores: slices below q0, lowest Q first) only spares the policy work."""
    from qunet.selection import select_by_disagreement

    qs = {"a": [0.3, 0.9, 0.05, 0.2, 0.31], "b": [0.1, 0.45, None, 0.6, 0.49], "c": [0.8, 0.7]}
    annotated, held = {"a": {2}}, {"b": {0}}
    for settings in (SelectionConfig(q0=0.5, slices_per_sample=2), SelectionConfig(q0=0.5, budget=5)):
        picks = [choose([VolumeState(i, q=q, annotated=annotated.get(i, set()), held=held.get(i, set()),
                                     ranked=select_by_disagreement([1.0 if v is None else v for v in q], 0.5) if ranked else None)
                         for i, q in qs.items()], MODEL, settings) for ranked in (True, False)]
        assert picks[0] == picks[1] and picks[0].slices


def test_spread_covers_volumes_and_spaces_slices():
    """`spread`: the least annotated volume before a model exists, and no two served slices (nor a served and an
    annotated one) closer than the even spacing; the paper's pick serves the best-ranked slices, neighbours or not."""
    initial = [10, 11, 12, 30, 31, 0, 20]
    volumes = [VolumeState("a", initial=initial, annotated={25}), VolumeState("b", initial=initial)]
    paper_pick = choose(volumes, LoopState(), SelectionConfig(slices_per_sample=3))
    assert (paper_pick.image_id, paper_pick.slices) == ("a", [10, 11, 12])
    pick = choose(volumes, LoopState(), SelectionConfig(slices_per_sample=3, pick="spread"))
    assert (pick.image_id, pick.slices) == ("b", [10, 30, 0])  # span 32 over 4: at least 8 apart
    annotated = choose([VolumeState("a", initial=initial, annotated={25})], LoopState(),
                       SelectionConfig(slices_per_sample=3, pick="spread"))
    assert annotated.slices == [10, 0, 11]  # 30 and 20 are near the annotated 25; too few spaced: the best-ranked rest
    q = [0.1, 0.15, 0.2, 0.9, 0.9, 0.9, 0.3, 0.9]
    scored = choose([VolumeState("a", q=q)], MODEL, SelectionConfig(q0=0.5, slices_per_sample=2, pick="spread"))
    assert scored.slices == [0, 2] and scored.scores == [0.1, 0.2]  # lowest Q, spaced: 1 is adjacent to 0
