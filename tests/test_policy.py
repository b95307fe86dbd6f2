"""Next sample's policy (qunet.policy) on hand-made records: phases, the paper's pick, the default `lesion` pick,
holds, stop signal, budget."""

import math
from dataclasses import replace

import pytest

from qunet.config import SelectionConfig
from qunet.policy import DISAGREEMENT, INITIAL, SCORING, VARIANTS, LoopState, VolumeState, choose, rescore_order
from qunet.stopping import agreement
from qunet.variants import covering

MODEL = LoopState(has_model=True)
PAPER = SelectionConfig(pick="paper")  # the tests below check QU-net++ as published; `lesion` has its own


def test_initial_phase_serves_s0_volume_by_volume_skipping_annotated_and_held():
    volumes = [VolumeState("b", initial=[4, 0]), VolumeState("a", initial=[5, 2, 7], annotated={5}, held={2})]
    pick = choose(volumes, LoopState(), SelectionConfig(pick="paper", slices_per_sample=2))
    assert (pick.phase, pick.image_id, pick.slices, pick.scores) == (INITIAL, "a", [7], [2.0])  # id order, S0 rank
    done = [VolumeState("a", initial=[1], annotated={1}), VolumeState("b", initial=[3], held={3})]
    empty = choose(done, LoopState(), PAPER)
    assert empty.image_id is None and not empty.slices and empty.stop is None and "train a model" in empty.message


def test_disagreement_phase_serves_the_volume_with_the_lowest_q_lowest_first():
    volumes = [
        VolumeState("a", q=[0.3, 0.9, 0.05, 0.2], annotated={2}),  # 0.05 is annotated: not open
        VolumeState("b", q=[0.1, 0.45, None, 0.6, 0.49], held={0}),
    ]  # 0.1 is held by another client
    pick = choose(volumes, MODEL, SelectionConfig(pick="paper", q0=0.5, slices_per_sample=2))
    assert (pick.phase, pick.image_id, pick.slices, pick.scores) == (DISAGREEMENT, "a", [3, 0], [0.2, 0.3])
    assert pick.below_q0 == 5 and pick.stop is None and pick.q0 == 0.5
    unheld = choose(
        [volumes[0], VolumeState("b", q=volumes[1].q)],
        MODEL,
        SelectionConfig(pick="paper", q0=0.5, slices_per_sample=2),
    )
    assert (unheld.image_id, unheld.slices) == ("b", [0, 1])


def test_scoring_phase_until_a_rescored_volume_has_a_slice_below_q0():
    s0 = {"initial": [2, 1]}
    waiting = [VolumeState("a", **s0), VolumeState("b", **s0, q=[0.9, 0.8, 0.95])]  # a: not scored by this model yet
    pick = choose(waiting, MODEL, PAPER)
    assert (pick.phase, pick.pending, pick.image_id, pick.slices) == (SCORING, 1, "a", [2, 1])  # S0 meanwhile
    assert pick.stop is None  # nothing below q0 yet, but a is still to be scored
    nothing_open = [VolumeState("a", initial=[1], annotated={1}), VolumeState("b", q=[0.9, 0.8, 0.95])]
    empty = choose(nothing_open, MODEL, PAPER)
    assert empty.phase == SCORING and empty.image_id is None and "1 volume(s) to go" in empty.message
    ready = [VolumeState("a", **s0), VolumeState("b", **s0, q=[0.9, 0.2, 0.95])]
    early = choose(ready, MODEL, PAPER)  # b is re-scored and has a slice below q0: served while a is scored
    assert (early.phase, early.image_id, early.slices, early.pending) == (DISAGREEMENT, "b", [1], 1)
    unscorable = choose([VolumeState("a", unscorable=True), waiting[1]], MODEL, PAPER)
    assert unscorable.pending == 0 and unscorable.stop.reason == "no_slice_below_q0"


def test_stop_when_no_unannotated_slice_is_below_q0():
    volumes = [VolumeState("a", q=[0.2, 0.7], annotated={0}), VolumeState("b", q=[0.9, 1.0])]
    pick = choose(volumes, MODEL, SelectionConfig(pick="paper", q0=0.5))
    assert pick.image_id is None and pick.stop.reason == "no_slice_below_q0" and pick.message == pick.stop.message
    assert choose(volumes, MODEL, SelectionConfig(pick="paper", q0=0.8)).slices == [1]  # a higher q0 still finds one


def test_stop_when_agreement_flattened_still_serves_slices():
    volumes = [VolumeState("a", q=[0.2, 0.7])]
    flat = choose(
        volumes, LoopState(True, agreement=[0.3, 0.61, 0.615]), SelectionConfig(pick="paper", stop_tolerance=0.01)
    )
    assert flat.stop.reason == "agreement_flattened" and flat.slices == [0]
    assert (
        choose(volumes, LoopState(True, agreement=[0.5, 0.61]), SelectionConfig(pick="paper", stop_tolerance=0.01)).stop
        is None
    )
    assert (
        choose(volumes, LoopState(True, agreement=[0.61, 0.61]), SelectionConfig(pick="paper", stop_tolerance=0)).stop
        is None
    )
    assert (
        choose(volumes, LoopState(True, agreement=[0.61]), SelectionConfig(pick="paper")).stop is None
    )  # one model: no trend
    assert agreement([1.0, 0.2, 0.4, 1.0, 0.9]) == 0.4  # slices with Q = 1 (both heads empty) left out
    assert agreement([1.0, 1.0]) is None


def test_budget_lowers_q0_and_caps_the_answer():
    volumes = [VolumeState("a", q=[0.1, 0.2, 0.3, 0.4], annotated={3}), VolumeState("b", q=[0.15, 0.9], held={1})]
    pick = choose(volumes, MODEL, SelectionConfig(pick="paper", q0=0.5, budget=4, slices_per_sample=10))
    # spent: 1 annotated + 1 held = 2, so 2 left: q0 drops to the 3rd lowest open Q (0.2), leaving 0.1 and 0.15
    assert pick.remaining == 2 and pick.q0 == 0.2 and pick.below_q0 == 2
    assert (pick.image_id, pick.slices) == ("a", [0])
    spent = choose(volumes, MODEL, SelectionConfig(pick="paper", budget=2))
    assert spent.stop.reason == "budget_spent" and spent.image_id is None and spent.remaining == 0
    before_model = choose([VolumeState("a", initial=[0, 1, 2])], LoopState(), SelectionConfig(pick="paper", budget=2))
    assert before_model.slices == [0, 1] and before_model.remaining == 2


def test_rescore_order_puts_volumes_never_scored_first_then_lowest_open_q():
    volumes = [
        VolumeState("a", q=[0.9, 0.05], annotated={1}),
        VolumeState("b", q=[0.3, 0.7]),
        VolumeState("c"),
        VolumeState("d", q=[0.1]),
    ]
    assert rescore_order(volumes) == ["c", "d", "b", "a"]  # a's 0.05 is annotated: its lowest open Q is 0.9


def test_variant_is_a_setting():
    assert set(VARIANTS) == {"paper", "spread", "lesion", "middles", "interior"} and SelectionConfig().pick == "lesion"
    with pytest.raises(KeyError):
        choose([], LoopState(), SelectionConfig(pick="no-such-variant"))


def test_ranked_slices_give_the_same_pick_as_q_alone():
    """`ranked` (what the app's scoring run stores: slices below q0, lowest Q first) only spares the policy work."""
    from qunet.selection import select_by_disagreement

    qs = {"a": [0.3, 0.9, 0.05, 0.2, 0.31], "b": [0.1, 0.45, None, 0.6, 0.49], "c": [0.8, 0.7]}
    annotated, held = {"a": {2}}, {"b": {0}}
    for settings in (
        SelectionConfig(pick="paper", q0=0.5, slices_per_sample=2),
        SelectionConfig(pick="paper", q0=0.5, budget=5),
    ):
        picks = [
            choose(
                [
                    VolumeState(
                        i,
                        q=q,
                        annotated=annotated.get(i, set()),
                        held=held.get(i, set()),
                        ranked=select_by_disagreement([1.0 if v is None else v for v in q], 0.5) if ranked else None,
                    )
                    for i, q in qs.items()
                ],
                MODEL,
                settings,
            )
            for ranked in (True, False)
        ]
        assert picks[0] == picks[1] and picks[0].slices


def test_spread_covers_volumes_and_spaces_slices():
    """`spread`: the least annotated volume before a model exists, and no two served slices (nor a served and an
    annotated one) closer than the even spacing; the paper's pick serves the best-ranked slices, neighbours or not."""
    initial = [10, 11, 12, 30, 31, 0, 20]
    volumes = [VolumeState("a", initial=initial, annotated={25}), VolumeState("b", initial=initial)]
    paper_pick = choose(volumes, LoopState(), SelectionConfig(pick="paper", slices_per_sample=3))
    assert (paper_pick.image_id, paper_pick.slices) == ("a", [10, 11, 12])
    pick = choose(volumes, LoopState(), SelectionConfig(slices_per_sample=3, pick="spread"))
    assert (pick.image_id, pick.slices) == ("b", [10, 30, 0])  # span 32 over 4: at least 8 apart
    annotated = choose(
        [VolumeState("a", initial=initial, annotated={25})],
        LoopState(),
        SelectionConfig(slices_per_sample=3, pick="spread"),
    )
    assert annotated.slices == [10, 0, 11]  # 30 and 20 are near the annotated 25; too few spaced: the best-ranked rest
    q = [0.1, 0.15, 0.2, 0.9, 0.9, 0.9, 0.3, 0.9]
    scored = choose([VolumeState("a", q=q)], MODEL, SelectionConfig(q0=0.5, slices_per_sample=2, pick="spread"))
    assert scored.slices == [0, 2] and scored.scores == [0.1, 0.2]  # lowest Q, spaced: 1 is adjacent to 0


def _brute_force(volumes: list[VolumeState], loop: LoopState, settings: SelectionConfig) -> tuple:
    """The pick's rules written out over every volume: (phase, image, slices, q0, below, pending, remaining)."""
    held = {v.image_id: set(v.held) - set(v.annotated) for v in volumes}
    annotated = {v.image_id: v.annotated for v in volumes}
    remaining = None
    if settings.budget:
        remaining = max(0, settings.budget - sum(len(v.annotated) + len(held[v.image_id]) for v in volumes))
    open_q = (
        {
            v.image_id: sorted(
                (q, k) for k, q in enumerate(v.q or ()) if q is not None and q < settings.q0 and k not in v.annotated
            )
            for v in volumes
            if v.q is not None
        }
        if loop.has_model
        else {}
    )
    q0 = settings.q0
    unheld = sorted(q for i, o in open_q.items() for q, k in o if k not in held[i])
    if remaining is not None and len(unheld) > remaining:
        q0 = unheld[remaining]
    below = sum(q < q0 for o in open_q.values() for q, _ in o)
    pending = sum(v.q is None and not v.unscorable for v in volumes) if loop.has_model else 0
    limit = settings.slices_per_sample if remaining is None else min(settings.slices_per_sample, remaining)
    low = sorted(
        (o[0][1], i, o)
        for i, o in ((i, [(k, q) for q, k in o if q < q0 and k not in held[i]]) for i, o in open_q.items())
        if o
    )
    variant = VARIANTS[settings.pick]
    covers = {
        v.image_id: variant.prefer is not None and v.depth is not None and (v.initial is not None or v.q is not None)
        for v in volumes
    }
    # the volume order counts held slices as annotated
    s0 = sorted(
        (
            variant.initial_key(replace(v, annotated=v.annotated | held[v.image_id])),
            v.image_id,
            v,
            covering(
                v.depth,
                v.annotated | held[v.image_id],
                variant.prefer(v),
                1
                if variant.first_alone and not v.annotated | held[v.image_id]
                else min(limit, math.ceil(v.depth * variant.share)),
                v.constant,
            )
            if covers[v.image_id]
            else [(k, float(r)) for r, k in enumerate(v.initial) if k not in v.annotated and k not in held[v.image_id]],
        )
        for v in volumes
        if v.initial is not None or covers[v.image_id]
    )
    s0 = [entry for entry in s0 if entry[3]]
    phase, image, slices = (DISAGREEMENT if loop.has_model else INITIAL), None, []
    if limit > 0 and variant.prefer is not None and s0:  # covering, with or without a model
        _, image, v, slices = s0[0]
        if loop.has_model and v.q is None:
            phase = SCORING if pending else INITIAL
    elif limit > 0 and variant.prefer is None and loop.has_model and low:
        _, image, slices = low[0]
    elif limit > 0 and variant.prefer is None:
        phase = SCORING if loop.has_model and pending else phase
        if s0 and (not loop.has_model or pending):
            _, image, _, slices = s0[0]
    if image is not None:
        slices = VARIANTS[settings.pick].order(slices, annotated[image], limit)[:limit]
    return phase, image, [k for k, _ in slices], q0, below, pending, remaining


def test_kept_ranking_updated_volume_by_volume_answers_as_the_rules_say():
    """The app keeps one Ranking and puts each volume whose records changed; its answers must equal the rules
    applied to every volume afresh, whatever the order of changes, holds, budget and variant."""
    import random

    from qunet.policy import Ranking

    rng = random.Random(7)

    def random_volume(i: int, unscored: float, lesion: tuple[int, ...]) -> VolumeState:
        depth = rng.randint(3, 12)
        q = (
            None
            if rng.random() < unscored
            else [None if rng.random() < 0.1 else round(rng.random(), 2) for _ in range(depth)]
        )
        area = None if q is None or rng.random() < 0.1 else [None if v is None else rng.choice(lesion) for v in q]
        return VolumeState(
            f"v{i:02d}",
            initial=None if rng.random() < 0.2 else rng.sample(range(depth), rng.randint(1, depth)),
            q=q,
            annotated=frozenset(rng.sample(range(depth), rng.randint(0, 3))),
            unscorable=rng.random() < 0.05,
            area=area,
            depth=None if rng.random() < 0.1 else depth,
            constant=frozenset(rng.sample(range(depth), rng.choice((0, 0, 1, depth)))),
        )

    served = 0
    usual, every_volume_scored = (30, 40, 0.3, (0, 0, 3, 7, 7, 40)), (4, 6, 0.0, (0,) * 12 + (5,))  # the fallbacks
    for settings, (count, ids, unscored, lesion) in (
        (SelectionConfig(slices_per_sample=3), usual),
        (SelectionConfig(budget=12, slices_per_sample=4), usual),
        (SelectionConfig(q0=0.3, pick="spread", slices_per_sample=2), usual),
        (SelectionConfig(q0=0.2, slices_per_sample=2), every_volume_scored),
        (SelectionConfig(pick="lesion", slices_per_sample=3), usual),
        (SelectionConfig(pick="lesion", budget=12), usual),
        (SelectionConfig(pick="lesion", q0=0.2), every_volume_scored),
        (SelectionConfig(pick="middles", slices_per_sample=3), usual),
    ):
        states = {i: random_volume(i, unscored, lesion) for i in range(count)}
        ranking = Ranking(settings, states.values())
        for step in range(150):
            i = rng.randrange(ids)
            if rng.random() < 0.1:
                states.pop(i, None)
                ranking.discard(f"v{i:02d}")
            else:
                states[i] = random_volume(i, unscored, lesion)
                ranking.put(states[i])
            held = {f"v{j:02d}": frozenset(rng.sample(range(4), 2)) for j in rng.sample(range(ids), 3)}
            volumes = [replace(v, held=held.get(v.image_id, frozenset())) for v in states.values()]
            for loop in (LoopState(), MODEL):
                pick = ranking.choose(loop, held)
                assert (
                    pick.phase,
                    pick.image_id,
                    pick.slices,
                    pick.q0,
                    pick.below_q0,
                    pick.pending,
                    pick.remaining,
                ) == _brute_force(volumes, loop, settings), (settings, step, loop)
                assert pick == choose(volumes, loop, settings)
                served += bool(pick.slices)
    assert served > 800  # most answers served slices: the comparison covered real picks


def test_covering_spreads_over_the_axis_and_prefers_quality_within_a_stratum():
    assert [k for k, _ in covering(32, set(), {}, 7)] == [15, 31, 0, 23, 7, 11, 19]  # middle, ends, quarters, ...
    assert [k for k, _ in covering(32, {15}, {}, 2)] == [31, 0]  # away from what is taken
    # 30 is preferred and lies in the stratum of 31 (at least 3/4 of the farthest distance): it wins there; 9 never
    # lies in a stratum
    assert [k for k, _ in covering(32, {15}, {9: 0, 30: 1}, 2)] == [30, 0]
    assert covering(4, {0, 1, 2, 3}, {}, 3) == [] and [k for k, _ in covering(5, {0, 1, 2, 3}, {}, 3)] == [4]


def test_covering_with_ends_last_spreads_over_the_interior():
    assert [k for k, _ in covering(32, set(), {}, 7, ends_last=True)] == [15, 7, 23, 3, 11, 19, 27]  # middle, quarters
    assert [k for k, _ in covering(32, {15}, {}, 2, ends_last=True)] == [7, 23]
    # the end slices come once every interior gap is as narrow as their distance to the end; none is left out
    picked = [k for k, _ in covering(9, set(), {}, 9, ends_last=True)]
    assert picked[:3] == [4, 1, 6] and sorted(picked) == list(range(9))


def test_lesion_covers_every_volume_preferring_predicted_lesion_within_a_stratum():
    settings = SelectionConfig(slices_per_sample=3, pick="lesion")  # an answer: at most an eighth of a volume
    assert choose([VolumeState("c", initial=[], depth=40)], LoopState(), settings).slices == [19, 39, 0]
    cold = [VolumeState("a", initial=[2], annotated={7}, depth=16), VolumeState("b", initial=[9, 2], depth=16)]
    pick = choose(cold, LoopState(), settings)
    assert (pick.phase, pick.image_id, pick.slices) == (
        INITIAL,
        "b",
        [9, 2],
    )  # least annotated; S0's best near the middle, then near an end
    area_a = [0, 0, 0, 0, 5, 40, 38, 30, 2, 0, 0, 0, 0, 0, 60, 0]
    scored = [
        VolumeState("a", initial=[2], q=[0.9] * 16, annotated={14}, area=area_a, depth=16),
        VolumeState("b", initial=[2], q=[0.9] * 16, annotated={3}, area=[0] * 15 + [39], depth=16),
    ]
    pick = choose(scored, MODEL, settings)
    # equally annotated: a holds the most open predicted lesion (40; its 60 is annotated); spread over a's axis (the
    # end away from 14, then between), the most predicted lesion within each stratum (38 of 6, 7 and 8)
    assert (pick.phase, pick.image_id, pick.slices) == (DISAGREEMENT, "a", [0, 6])
    assert choose([scored[0], replace(scored[1], area=[0] * 15 + [45])], MODEL, settings).image_id == "b"
    assert (
        choose([scored[0], replace(scored[1], annotated=frozenset())], MODEL, settings).image_id == "b"
    )  # less annotated
    crowded = [replace(scored[0], held={5, 6}), replace(scored[1], annotated={3, 4, 12, 13})]
    assert choose(crowded, MODEL, settings).slices == [0, 10]  # held: neither offered nor crowded
    # held slices count as annotated in the volume order: a (1 annotated, 2 held) comes after b (1 annotated)
    assert choose([replace(scored[0], held={5, 6}), scored[1]], MODEL, settings).image_id == "b"
    nothing = [replace(v, area=[0] * 16) for v in scored]
    quality = choose(nothing, MODEL, settings)  # the model finds lesion nowhere: S0's best within a stratum
    assert (quality.phase, quality.image_id, quality.slices) == (DISAGREEMENT, "a", [2, 8])
    assert quality.stop.reason == "no_slice_below_q0"  # Q is spent, the stop signal says so; slices are still offered
    waiting = choose([replace(scored[0], annotated={1, 14}), replace(scored[1], q=None, area=None)], MODEL, settings)
    assert (waiting.phase, waiting.image_id, waiting.pending) == (
        SCORING,
        "b",
        1,
    )  # b not re-scored yet: covered anyway
    broken = replace(
        scored[1], q=None, area=None, annotated=frozenset(), unscorable=True
    )  # a quality record, no Q to come
    unscored = choose([scored[0], broken], MODEL, settings)
    assert (unscored.phase, unscored.image_id, unscored.pending) == (INITIAL, "b", 0)
    # constant slices (no contrast) are never served; a volume of them only is passed over
    flat = VolumeState("c", initial=[], depth=16, constant=frozenset(range(16)))
    pick = choose([flat, replace(cold[1], constant=frozenset({9, 7, 8}))], LoopState(), settings)
    assert (pick.image_id, pick.slices) == ("b", [6, 15])


def test_middles_asks_for_every_volume_middle_before_a_second_slice_of_any():
    settings = SelectionConfig(slices_per_sample=10, pick="middles")
    volumes = [VolumeState(i, initial=[], depth=33) for i in ("a", "b", "c")]
    served = []
    for _ in range(4):  # one annotator asking again and again: the slices served so far are held
        held = {i: {k for j, k in served if j == i} for i in ("a", "b", "c")}
        pick = choose([replace(v, held=frozenset(held[v.image_id])) for v in volumes], LoopState(), settings)
        served += [(pick.image_id, k) for k in pick.slices]
    # one slice per volume, the middle, then `lesion`'s answer (an eighth of 33, rounded up: 5) from the first again
    assert served[:3] == [("a", 16), ("b", 16), ("c", 16)] and [j for j, _ in served[3:]] == ["a"] * 5
    assert [k for _, k in served[3:]] == choose(
        [replace(volumes[0], annotated={16})], LoopState(), replace(settings, pick="lesion")
    ).slices
    # with a model: the first slice of an unannotated volume is where it predicts the most lesion, near the middle
    area = [0] * 33
    area[14], area[2] = 30, 90
    pick = choose([VolumeState("d", initial=[], q=[0.9] * 33, area=area, depth=33)], MODEL, settings)
    assert (pick.phase, pick.image_id, pick.slices) == (DISAGREEMENT, "d", [14])
