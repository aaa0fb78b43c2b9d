"""TokenBudgetBatchSampler: budget, exactly-once across ranks, equal counts, shuffle, padding, resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from hetrain.data.sampler import TokenBudgetBatchSampler


def zipf_lengths(n: int, max_len: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.minimum(rng.zipf(1.3, n) * 8, max_len).astype(np.int64)


def rank_samplers(lengths, num_replicas, **kw):
    return [TokenBudgetBatchSampler(lengths, num_replicas=num_replicas, rank=r, **kw) for r in range(num_replicas)]


@pytest.mark.parametrize("max_tokens", [512, 1000, 4096])
def test_budget_respected(max_tokens):
    lengths = zipf_lengths(3001)
    sampler = TokenBudgetBatchSampler(lengths, max_tokens, seed=3)
    batches = list(sampler)
    for batch in batches:
        assert len(batch) * lengths[batch].max() <= max_tokens
    assert sampler.max_batch_rows == max(len(b) for b in batches)
    # Greedy cutting leaves no batch that could have taken the next sample of the sorted order.
    plan = TokenBudgetBatchSampler(lengths, max_tokens, shuffle=False).global_plan()
    for batch, following in zip(plan, plan[1:], strict=False):
        assert (len(batch) + 1) * lengths[following[0]] > max_tokens


@pytest.mark.parametrize("num_replicas", [1, 2, 3, 5])
def test_every_sample_once_and_equal_counts(num_replicas):
    lengths = zipf_lengths(997, seed=1)
    samplers = rank_samplers(lengths, num_replicas, max_tokens=700, seed=5)
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1, "ranks must take the same number of steps"
    assert all(len(s) == len(b) for s, b in zip(samplers, per_rank, strict=True))
    seen = Counter(i for batches in per_rank for batch in batches for i in batch)
    assert sorted(seen) == list(range(len(lengths)))
    assert set(seen.values()) == {1}
    assert all(s.repeated == [False] * len(b) for s, b in zip(samplers, per_rank, strict=True))  # none repeats
    for batches in per_rank:
        for batch in batches:
            assert len(batch) * lengths[batch].max() <= 700


def test_drop_last_drops_only_the_ragged_tail():
    lengths = zipf_lengths(500, seed=2)
    samplers = rank_samplers(lengths, 4, max_tokens=600, drop_last=True)
    per_rank = [list(s) for s in samplers]
    global_batches = samplers[0].num_global_batches
    assert all(len(b) == global_batches // 4 for b in per_rank)
    seen = Counter(i for batches in per_rank for batch in batches for i in batch)
    kept = samplers[0].global_plan()[: global_batches // 4 * 4]
    assert global_batches % 4, "the case must have a ragged tail to drop"
    assert seen == Counter(int(i) for batch in kept for i in batch)  # the whole rounds, each sample once


def test_single_sample_batches_repeat_rather_than_hang():
    # Three samples of the full budget: one per batch, four ranks -> one rank repeats a batch.
    samplers = rank_samplers([8, 8, 8], 4, max_tokens=8, shuffle=False)
    per_rank = [list(s) for s in samplers]
    assert [len(b) for b in per_rank] == [1, 1, 1, 1]
    assert sorted({i for b in per_rank for batch in b for i in batch}) == [0, 1, 2]


def test_shuffle_is_deterministic_per_epoch_and_seed():
    lengths = zipf_lengths(800, seed=4)
    a = TokenBudgetBatchSampler(lengths, 1024, seed=11)
    b = TokenBudgetBatchSampler(lengths, 1024, seed=11)
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert list(a) == list(b)
    a.set_epoch(0)
    e0 = list(a)
    a.set_epoch(1)
    assert list(a) != e0
    c = TokenBudgetBatchSampler(lengths, 1024, seed=12)
    assert list(c) != e0
    # Without shuffling the batches run from short to long.
    plain = list(TokenBudgetBatchSampler(lengths, 1024, shuffle=False))
    longest = [int(lengths[b].max()) for b in plain]
    assert longest == sorted(longest)


def test_a_negative_seed_shuffles_as_its_value_modulo_2_64_and_other_seeds_keep_their_plans():
    # numpy's default_rng refused a negative seed with a bare "expected non-negative integer".
    lengths = [3, 4, 5, 6, 3, 4, 5, 6, 2, 7]

    def epochs(seed):
        sampler = TokenBudgetBatchSampler(lengths, 12, seed=seed)
        plans = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            plans.append([[int(i) for i in batch] for batch in sampler])
        return sampler, plans

    negative, plans = epochs(-1)
    assert plans == epochs(2**64 - 1)[1]  # as EpochShuffle takes it
    assert negative.state_dict()["seed"] == -1  # the state keeps the seed as given
    # The plans of non-negative seeds, as they were before negative seeds were taken.
    assert epochs(7)[1] == [[[9], [3, 7], [1, 5], [6, 2], [8, 4, 0]], [[7, 3], [9], [1, 5], [6, 2], [8, 4, 0]]]
    assert epochs(2**64 - 1)[1] == [[[5, 1], [8, 4, 0], [6, 2], [9], [3, 7]],
                                    [[5, 1], [9], [6, 2], [8, 4, 0], [7, 3]]]
    assert epochs(2**64 + 5)[1] == [[[8, 4, 0], [6, 2], [9], [5, 1], [7, 3]],
                                    [[1, 5], [3, 7], [9], [2, 6], [8, 0, 4]]]


def test_padding_fraction_matches_batches_and_beats_fixed_size():
    lengths = zipf_lengths(4000, seed=6)
    sampler = TokenBudgetBatchSampler(lengths, 4096, seed=0)
    batches = list(sampler)
    padded = sum(len(b) * int(lengths[b].max()) for b in batches)
    assert sampler.padding_fraction == pytest.approx(1 - lengths.sum() / padded)
    # Fixed-size random batches with the same mean number of rows pad far more.
    rows = round(len(lengths) / len(batches))
    perm = np.random.default_rng(0).permutation(len(lengths))
    fixed = [perm[i : i + rows] for i in range(0, len(perm), rows)]
    fixed_padding = 1 - lengths.sum() / sum(len(b) * int(lengths[b].max()) for b in fixed)
    assert sampler.padding_fraction < 0.05 < fixed_padding


@pytest.mark.parametrize(("before", "after", "steps"), [(2, 3, 7), (4, 1, 3), (3, 2, 0), (1, 4, 10)])
def test_resume_on_another_layout_consumes_the_rest_once(before, after, steps):
    lengths = zipf_lengths(1201, seed=7)
    first = rank_samplers(lengths, before, max_tokens=800, seed=9)
    for s in first:
        s.set_epoch(2)
    consumed = []
    for s in first:
        it = iter(s)
        consumed += [next(it) for _ in range(steps)]
    states = [s.state_dict() for s in first]
    assert all(st == states[0] for st in states), "every rank reports the same global state"
    assert states[0]["position"] == steps * before

    resumed = rank_samplers(lengths, after, max_tokens=800, seed=0)  # the seed comes from the state
    for s in resumed:
        s.load_state_dict(states[1 % before])
        s.set_epoch(2)  # what Lightning calls at the start of the resumed epoch: keeps the position
    announced = [len(s) for s in resumed]  # the whole epoch, the saving ranks' steps included (Lightning's count)
    rest = [list(s) for s in resumed]
    assert [steps + len(r) for r in rest] == announced and len({len(r) for r in rest}) == 1
    seen = Counter(i for batch in consumed for i in batch)
    seen.update(i for batches in rest for batch in batches for i in batch)
    assert sorted(seen) == list(range(len(lengths))) and set(seen.values()) == {1}

    # The resumed run sees the global plan's remaining batches in order (halving keeps the order).
    plan = first[0].global_plan(2)
    merged = [i for k in range(len(rest[0])) for r in range(after) for i in rest[r][k]]
    assert merged == [i for b in plan[steps * before :] for i in b.tolist()]


def test_resume_position_is_forgotten_in_the_next_epoch():
    lengths = zipf_lengths(300, seed=8)
    s = TokenBudgetBatchSampler(lengths, 512, seed=1)
    total = len(s)
    it = iter(s)
    next(it), next(it)
    t = TokenBudgetBatchSampler(lengths, 512)
    t.load_state_dict(s.state_dict())
    assert len(t) == total and len(list(t)) == total - 2  # len counts the epoch; iteration yields the rest
    t.set_epoch(1)
    assert len(t) == total and len(list(t)) == total


def test_state_from_another_dataset_is_refused():
    s = TokenBudgetBatchSampler([3, 4, 5], 10)
    with pytest.raises(ValueError, match="batch plans would differ"):
        TokenBudgetBatchSampler([3, 4], 10).load_state_dict(s.state_dict())


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="sample 1 has length 20"):
        TokenBudgetBatchSampler([5, 20, 3], 16)
    with pytest.raises(ValueError, match="rank"):
        TokenBudgetBatchSampler([5], 16, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="non-empty"):
        TokenBudgetBatchSampler([], 16)


@pytest.mark.parametrize("after", [1, 2, 3])
def test_resume_after_half_of_a_halved_batch_loses_no_sample(after):
    # 7 global batches on 2 ranks: one of the last is halved, and 2 steps end between its two halves.
    lengths = [10] * 4 + [20] * 2 + [30] * 2 + [40] * 2 + [50] * 2
    first = rank_samplers(lengths, 2, max_tokens=60, shuffle=False)
    consumed = []
    for s in first:
        it = iter(s)
        consumed += [i for _ in range(2) for i in next(it)]
    state = first[0].state_dict()
    resumed = rank_samplers(lengths, after, max_tokens=60, shuffle=False)
    for s in resumed:
        s.load_state_dict(state)
    rest = [i for s in resumed for batch in s for i in batch]
    assert set(consumed) | set(rest) == set(range(len(lengths))) and not set(consumed) & set(rest)
    assert set(Counter(consumed).values()) == {1}
    if after < 3:  # on three ranks the single-sample batches left cannot be shared out: one rank repeats one
        assert set(Counter(rest).values()) == {1}


def test_states_and_settings_that_would_train_on_nothing_are_refused():
    lengths = zipf_lengths(40, seed=4)
    with pytest.raises(ValueError, match="no sample at all: is the dataset or the token corpus empty"):
        TokenBudgetBatchSampler([], 64)
    batches = TokenBudgetBatchSampler(lengths, 4096).num_global_batches
    with pytest.raises(ValueError, match=rf"drop_last=True leaves no batch: {batches} batches .* for 64 ranks"):
        TokenBudgetBatchSampler(lengths, 4096, num_replicas=64, rank=0, drop_last=True)
    sampler = TokenBudgetBatchSampler(lengths, 512)
    state = sampler.state_dict()
    with pytest.raises(ValueError, match=r"lacks \['position'\]"):
        sampler.load_state_dict({k: v for k, v in state.items() if k != "position"})
    with pytest.raises(ValueError, match="position 999 is outside this epoch's"):  # an empty epoch, silently, before
        sampler.load_state_dict({**state, "position": 999})


def test_lengths_that_are_not_whole_numbers_are_refused_not_truncated():
    assert TokenBudgetBatchSampler([3.0, 4.0], 16).lengths.tolist() == [3, 4]
    with pytest.raises(ValueError, match="lengths must be whole numbers, got 3.5 at index 1"):
        TokenBudgetBatchSampler([2, 3.5], 16)


def test_an_empty_validation_split_says_how_to_turn_validation_off():
    # The sampler's own message asked whether the dataset was empty, not how to run without validation.
    from hetrain.data.datamodule import SyntheticDataModule

    dm = SyntheticDataModule(train_size=16, val_size=0, min_len=5, max_len=20, max_tokens=64)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"the val split holds no samples \(data.val_size=0.*set "
                                         r"trainer.limit_val_batches=0 to train without validation"):
        dm.val_dataloader()
    dm.teardown("fit")


def test_state_before_the_first_batch_is_the_new_epochs_start_or_the_loaded_position():
    # The counters of the last iteration were read until the next one began: after a whole epoch 0, a state
    # saved after set_epoch(1) said epoch 1 was over; one saved right after loading said position 0.
    lengths = zipf_lengths(300, seed=3)
    s = TokenBudgetBatchSampler(lengths, 512, seed=2)
    total = len(s)
    list(s)
    s.set_epoch(1)
    assert {k: s.state_dict()[k] for k in ("epoch", "position", "offset", "steps")} == \
        {"epoch": 1, "position": 0, "offset": 0, "steps": 0}

    it = iter(s)
    consumed = [i for _ in range(3) for i in next(it)]
    saved = s.state_dict()
    resumed = TokenBudgetBatchSampler(lengths, 512)
    resumed.load_state_dict(saved)
    again = resumed.state_dict()  # saved again before the first resumed batch
    assert again == saved
    rest = TokenBudgetBatchSampler(lengths, 512)
    rest.load_state_dict(again)
    assert len(rest) == total
    seen = Counter(consumed + [i for batch in rest for i in batch])
    assert sorted(seen) == list(range(len(lengths))) and set(seen.values()) == {1}


def test_a_state_from_another_batch_plan_is_refused_naming_what_differs():
    lengths = zipf_lengths(200, seed=5)
    s = TokenBudgetBatchSampler(lengths, 512, seed=1)
    it = iter(s)
    next(it), next(it)
    state = s.state_dict()
    with pytest.raises(ValueError, match="saved with shuffle=True, this sampler has shuffle=False"):
        TokenBudgetBatchSampler(lengths, 512, shuffle=False).load_state_dict(state)
    # The same count and the same values in another order give another plan (it names samples by index).
    for other in (zipf_lengths(200, seed=6), lengths[::-1]):
        with pytest.raises(ValueError, match="saved for other sample lengths"):
            TokenBudgetBatchSampler(other, 512).load_state_dict(state)
    # A state saved before these were recorded still loads.
    older = {k: v for k, v in state.items() if k not in ("shuffle", "lengths_digest")}
    t = TokenBudgetBatchSampler(lengths, 512)
    t.load_state_dict(older)
    assert t.state_dict() == state


# Epochs whose tail can only be shared out by repeating batches: every batch (or all but one) holds one sample.
REPEATING_EPOCHS = {
    "7 singles, 2 ranks": (dict(lengths=[64] * 7, num_replicas=2), [[[4], [1], [6], [2]], [[0], [3], [5], [4]]]),
    "a pair halved, 4 ranks": (dict(lengths=[32, 32] + [64] * 5, num_replicas=4, seed=3),
                               [[[4], [5]], [[0], [3]], [[1], [2]], [[6], [0]]]),
    "unshuffled, 3 ranks": (dict(lengths=[64] * 5, num_replicas=3, shuffle=False),
                            [[[0], [3]], [[1], [4]], [[2], [0]]]),
}


@pytest.mark.parametrize("case", REPEATING_EPOCHS)
def test_an_uninterrupted_epoch_repeats_the_batches_it_always_did(case):
    kw, expected = REPEATING_EPOCHS[case]
    assert [list(s) for s in rank_samplers(max_tokens=64, **kw)] == expected


@pytest.mark.parametrize("case", REPEATING_EPOCHS)
@pytest.mark.parametrize("steps", [0, 1])  # a whole epoch, and one resumed after a step
def test_the_batches_repeated_to_even_out_the_ranks_are_marked(case, steps):
    # Validation leaves out a batch marked repeated (its labels become -100): then every sample counts exactly once.
    kw, expected = REPEATING_EPOCHS[case]
    counted = Counter()
    first = rank_samplers(max_tokens=64, **kw)
    for s in first:
        it = iter(s)
        done = [next(it) for _ in range(steps)]
        counted.update(i for batch, repeated in zip(done, s.repeated, strict=False) if not repeated for i in batch)
    resumed = rank_samplers(max_tokens=64, **kw)
    for s, rank_expected in zip(resumed, expected, strict=True):
        s.load_state_dict(first[0].state_dict())
        batches = list(s)
        assert batches == rank_expected[steps:] and len(s.repeated) == len(batches)
        counted.update(i for batch, repeated in zip(batches, s.repeated, strict=True) if not repeated for i in batch)
    assert sorted(counted) == list(range(len(kw["lengths"]))) and set(counted.values()) == {1}


@pytest.mark.parametrize("case", REPEATING_EPOCHS)
def test_a_resume_in_an_epoch_that_repeats_batches_sees_the_uninterrupted_batches(case):
    kw, expected = REPEATING_EPOCHS[case]
    for steps in range(len(expected[0]) + 1):
        first = rank_samplers(max_tokens=64, **kw)
        done = []
        for s in first:
            it = iter(s)
            done.append([next(it) for _ in range(steps)])
        state = first[0].state_dict()
        resumed = rank_samplers(max_tokens=64, **kw)
        for s in resumed:
            s.load_state_dict(state)
            s.set_epoch(0)
        assert [d + list(s) for d, s in zip(done, resumed, strict=True)] == expected, f"resumed after {steps} steps"


def test_an_offset_outside_the_batch_at_the_position_is_refused_naming_both():
    # Only the position was checked: an offset past the batch's end resumed with an empty batch, one at its end went
    # on as the next position does, and a negative one skipped samples without a word.
    lengths = [4] * 12  # three batches of 4 samples at max_tokens=16
    state = TokenBudgetBatchSampler(lengths, 16, shuffle=False).state_dict()
    for offset in (4, 9, -3):
        sampler = TokenBudgetBatchSampler(lengths, 16, shuffle=False)
        with pytest.raises(ValueError, match=rf"offset {offset} is outside batch 1's 4 samples \(need 0 <= offset < "
                                             r"4\).*pass what state_dict\(\) returned"):
            sampler.load_state_dict({**state, "position": 1, "offset": offset})
        assert sampler.state_dict() == state  # a refused state changes nothing
    with pytest.raises(ValueError, match=r"offset 1 is past the epoch's end \(position 3 of 3 batches needs offset 0"):
        TokenBudgetBatchSampler(lengths, 16, shuffle=False).load_state_dict({**state, "position": 3, "offset": 1})
    resumed = TokenBudgetBatchSampler(lengths, 16, shuffle=False)
    resumed.load_state_dict({**state, "position": 1, "offset": 3})  # the last sample of the batch is still to come
    assert list(resumed) == [[7], [8, 9, 10, 11]]
    # The batch is the one of the state's seed and epoch, not of the loading sampler's.
    lengths = zipf_lengths(300, seed=3)
    saver = TokenBudgetBatchSampler(lengths, 512, seed=5)
    saver.set_epoch(2)
    state, plan = saver.state_dict(), saver.global_plan()
    own = TokenBudgetBatchSampler(lengths, 512).global_plan()
    k = next(i for i in range(len(plan)) if len(plan[i]) > len(own[i]))
    loader = TokenBudgetBatchSampler(lengths, 512)
    loader.load_state_dict({**state, "position": k, "offset": len(plan[k]) - 1})
    assert next(iter(loader)) == plan[k][-1:].tolist()
    with pytest.raises(ValueError, match=f"outside batch {k}'s {len(plan[k])} samples"):
        loader.load_state_dict({**state, "position": k, "offset": len(plan[k])})
