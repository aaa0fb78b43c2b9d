"""Token-budget dynamic batching: batches of similar-length sequences bounded by a padded-token budget.

A fixed batch size wastes compute on padding when lengths vary (a Zipf-like corpus pads a random
batch to its one long sequence). Here sequences are sorted by length and cut greedily into batches
whose padded size ``rows * longest`` stays within ``max_tokens``; the batch order is shuffled per
epoch from ``(seed, epoch)``.

The epoch's *global plan* (the list of batches) does not depend on the number of ranks. Rank ``r``
of ``R`` takes global batches ``r, r + R, ...``; when the count is not a multiple of ``R``, some of
the last batches are halved (a part of a batch stays within the budget), so every rank gets the same
number of batches and every sample is seen once per epoch. The resume state is ``(epoch, seed, position)``,
where ``position`` counts global batches consumed (and ``offset`` the samples consumed of the next one, when
a halved batch was half consumed); it loads into a sampler with any ``num_replicas``. The state also records what
the plan depends on (sample count, ``max_tokens``, ``shuffle``, a digest of the lengths in sample order), so that a
state from another plan is refused rather than resumed at a meaningless position.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from hetrain.data.integers import whole_numbers


class TokenBudgetBatchSampler:
    """An iterable of index lists for one rank; use as ``DataLoader(batch_sampler=...)`` or with ``RingLoader``.

    Args:
        lengths: token count of each sample (after windowing), all in ``[1, max_tokens]``.
        max_tokens: bound on ``len(batch) * max(lengths[batch])``, i.e. tokens including padding.
        shuffle: shuffle equal-length samples and the batch order per epoch; otherwise batches run short to long.
        seed: with the epoch, fixes the shuffle on every rank and process.
        num_replicas, rank: the data-parallel layout; each rank gets a disjoint share of equal batch count.
        drop_last: drop the last ``< num_replicas`` global batches instead of splitting them across ranks.

    ``repeated`` says, once an iteration has started, which of the batches it yields repeat samples that another
    batch of the epoch holds (the padding that gives every rank as many batches where no batch can be halved), for
    a validation loop to leave out of its metrics.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.lengths = whole_numbers(lengths, "lengths")
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            empty = " (no sample at all: is the dataset or the token corpus empty?)" if self.lengths.size == 0 else ""
            raise ValueError(f"hetrain: lengths must be a non-empty 1-D sequence, got shape "
                             f"{self.lengths.shape}{empty}")
        if max_tokens < 1:
            raise ValueError(f"hetrain: max_tokens must be positive, got {max_tokens}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"hetrain: need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        bad = np.flatnonzero((self.lengths < 1) | (self.lengths > max_tokens))
        if len(bad):
            i = int(bad[0])
            raise ValueError(
                f"hetrain: sample {i} has length {int(self.lengths[i])}, outside [1, max_tokens={max_tokens}] "
                f"({len(bad)} such samples); cut long documents into windows (hetrain.data.windows) first"
            )
        self.max_tokens = int(max_tokens)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0
        self._start = 0  # global position the next iteration starts from (set by load_state_dict)
        self._offset = 0  # samples of global batch ``_start`` consumed before the resume (a halved batch's first part)
        self._resumed_steps = 0  # this epoch's batches a rank had consumed before the resume
        self._yielded = 0  # batches this rank's current iteration has handed out
        self._iter_start = self._iter_offset = 0
        self.repeated: list[bool] = []  # per batch this rank's current iteration yields
        self._plan_cache: tuple[int, list[np.ndarray]] | None = None
        # Batch sizes depend only on the sorted lengths, not on which sample has which length: the
        # number of batches, the largest batch and the padding are the same in every epoch.
        self._sizes, self._padded = self._cut(np.sort(self.lengths))
        if drop_last and len(self._sizes) < num_replicas:
            raise ValueError(f"hetrain: drop_last=True leaves no batch: {len(self._sizes)} batches of at most "
                             f"{max_tokens} tokens for {num_replicas} ranks; lower max_tokens or set drop_last=False")

    # -- the global plan -------------------------------------------------------------------------

    def _cut(self, sorted_lengths: np.ndarray) -> tuple[list[int], int]:
        """Greedy cut of ascending lengths: a batch grows while ``rows * longest <= max_tokens``."""
        lens = sorted_lengths.tolist()
        n, sizes, padded, i = len(lens), [], 0, 0
        while i < n:
            # (j - i) * lens[j - 1] grows with j, so the largest j within the budget is found by bisection.
            j = bisect.bisect_right(range(i + 1, n + 1), self.max_tokens, key=lambda e: (e - i) * lens[e - 1]) + i
            sizes.append(j - i)
            padded += (j - i) * lens[j - 1]
            i = j
        return sizes, padded

    def global_plan(self, epoch: int | None = None) -> list[np.ndarray]:
        """Every batch of ``epoch`` (default: the current one) for all ranks together, in consumption order."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        plan = self._plan(epoch, self.seed)
        self._plan_cache = (epoch, plan)
        return plan

    def _plan(self, epoch: int, seed: int) -> list[np.ndarray]:
        """The global plan of ``epoch`` under ``seed``, uncached: ``load_state_dict`` checks a state against it
        before taking the state's seed."""
        # numpy refuses a negative seed: it is taken modulo 2**64, as EpochShuffle does (state keeps the raw seed);
        # every other seed as it is, so existing plans stay the same.
        rng = np.random.default_rng([seed % 2**64 if seed < 0 else seed, epoch])
        if self.shuffle:
            # Sort by length, equal lengths in random order, so batch composition varies between epochs.
            order = np.lexsort((rng.permutation(len(self.lengths)), self.lengths))
        else:
            order = np.argsort(self.lengths, kind="stable")
        plan = np.split(order, np.cumsum(self._sizes)[:-1])
        if self.shuffle:
            plan = [plan[k] for k in rng.permutation(len(plan))]
        return plan

    def _rounds(self, plan: list[np.ndarray], start: int, offset: int = 0) -> tuple[list[np.ndarray], int]:
        """The plan from sample ``offset`` of batch ``start``, cut to whole rounds: batch ``i`` goes to rank
        ``i % num_replicas``; and how many of the last of them repeat earlier samples.

        A resume at a round boundary of the whole epoch's rounds (always so on the layout that saved it) continues
        those rounds: balancing only the rest could halve or repeat other batches than the uninterrupted run does.
        """
        remaining = plan[start:]
        if offset and remaining:
            remaining[0] = remaining[0][offset:]
        if self.drop_last:
            return remaining[: len(remaining) // self.num_replicas * self.num_replicas], 0
        rounds, repeats = _balanced(plan, self.num_replicas)
        taken = sum(map(len, plan[:start])) + offset
        ends = np.cumsum([0, *map(len, rounds)])[:: self.num_replicas]  # samples before each round
        k = int(np.searchsorted(ends, taken))
        if k < len(ends) and ends[k] == taken:  # the repeats only fill up the last round: they all stay in
            return rounds[k * self.num_replicas :], repeats
        return _balanced(remaining, self.num_replicas)

    # -- Sampler protocol ------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's shuffle; a resumed position is kept only for the epoch it was saved in.

        A new epoch starts with nothing consumed, so that ``state_dict()`` before its first batch (Lightning saves
        in ``on_train_epoch_start``, after ``set_epoch``) points at its start rather than at the last epoch's end.
        """
        if epoch != self.epoch:
            self._start = self._offset = self._iter_start = self._iter_offset = self._resumed_steps = 0
            self._yielded = 0
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        start, offset, self._start, self._offset = self._start, self._offset, 0, 0
        self._iter_start, self._iter_offset, self._yielded = start, offset, 0
        if start == 0 and offset == 0:  # a fresh pass over the epoch: nothing was consumed before it
            self._resumed_steps = 0
        rounds, repeats = self._rounds(self.global_plan(), start, offset)
        self.repeated = [i >= len(rounds) - repeats for i in range(self.rank, len(rounds), self.num_replicas)]
        for batch in rounds[self.rank :: self.num_replicas]:
            self._yielded += 1
            yield batch.tolist()

    def __len__(self) -> int:
        """This rank's batches in the epoch, those consumed before a resume included.

        That is how Lightning counts: a resumed run restores its step count within the epoch and ends the
        epoch when the count reaches ``len()``, while iteration yields only the batches not yet consumed.
        """
        start = self._start or self._iter_start  # the resumed position, before and during its iteration
        return self._resumed_steps + self._rank_count(len(self._sizes) - start)

    def _rank_count(self, global_batches: int) -> int:
        if self.drop_last:
            return global_batches // self.num_replicas
        return -(-global_batches // self.num_replicas)

    def step_items(self, weights: np.ndarray | None = None) -> np.ndarray:
        """Items that all ranks together consume at each step of the current iteration, known before it runs.

        Indexed by step as Lightning counts them (``len()`` entries; the steps a resumed epoch had taken
        before the resume are zeros). An item is a sample, or with ``weights`` (one per sample, e.g. its
        non-padding tokens) the sum of their weights. Exact loss normalisation over an accumulation
        window and over ranks needs these counts before the window's first backward.
        """
        rounds, _ = self._rounds(self.global_plan(), self._iter_start, self._iter_offset)
        per_batch = [len(b) if weights is None else float(weights[b].sum()) for b in rounds]
        per_step = np.asarray(per_batch, dtype=np.float64).reshape(-1, self.num_replicas).sum(axis=1)
        return np.concatenate([np.zeros(self._resumed_steps), per_step])

    # -- what the plan costs ---------------------------------------------------------------------

    @property
    def num_global_batches(self) -> int:
        return len(self._sizes)

    @property
    def max_batch_rows(self) -> int:
        """Most samples in one batch of any epoch: what a preallocated slot must hold."""
        return max(self._sizes)

    @property
    def padding_fraction(self) -> float:
        """Share of the padded tokens that are padding, over a whole epoch (the same every epoch)."""
        return 1.0 - float(self.lengths.sum()) / self._padded

    # -- resume ----------------------------------------------------------------------------------

    def _cursor_after(self, steps: int) -> tuple[int, int]:
        """``(position, offset)`` after ``steps`` rounds: whole global batches, then samples of the next one.

        Halving splits a batch into its first part and the rest, and repeats come last, so the rounds
        consumed always cover whole batches and the first part of one more; counting rounds as global
        batches would skip the rest of a halved batch on resume.
        """
        plan = self.global_plan()
        rounds, _ = self._rounds(plan, self._iter_start, self._iter_offset)
        bounds = np.cumsum([0, *map(len, plan)])
        taken = sum(len(b) for b in rounds[: max(0, steps) * self.num_replicas])
        cursor = min(int(bounds[self._iter_start]) + self._iter_offset + taken, int(bounds[-1]))
        position = int(np.searchsorted(bounds, cursor, side="right")) - 1
        return position, cursor - int(bounds[position])

    def state_dict(self, steps: int | None = None) -> dict[str, Any]:
        """``(epoch, seed, position)`` after ``steps`` consumed batches (default: those yielded so far).

        A loader that prefetches should pass the number of batches the training loop really consumed.
        """
        steps = self._yielded if steps is None else steps
        steps = min(steps, self._rank_count(self.num_global_batches - self._iter_start))  # this iteration has no more
        position, offset = self._cursor_after(steps)
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "position": position,
            "offset": offset,
            "steps": self._resumed_steps + steps,
            "num_samples": len(self.lengths),
            "max_tokens": self.max_tokens,
            "num_replicas": self.num_replicas,
            "shuffle": bool(self.shuffle),
            "lengths_digest": self._lengths_digest,
        }

    @functools.cached_property
    def _lengths_digest(self) -> str:
        """A digest of the lengths in sample order: the plan depends on which sample has which length."""
        data = np.ascontiguousarray(self.lengths, dtype="<i8").tobytes()
        return hashlib.blake2b(data, digest_size=16).hexdigest()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues where ``state`` stopped, whatever ``num_replicas`` the saving run had."""
        missing = [k for k in ("epoch", "seed", "position", "num_samples", "max_tokens") if k not in state]
        if missing:
            raise ValueError(f"hetrain: the sampler state lacks {missing}; pass what state_dict() returned")
        if not 0 <= int(state["position"]) <= self.num_global_batches:
            raise ValueError(f"hetrain: the sampler state's position {state['position']} is outside this epoch's "
                             f"{self.num_global_batches} batches")
        if state["num_samples"] != len(self.lengths) or state["max_tokens"] != self.max_tokens:
            raise ValueError(
                f"hetrain: the sampler state was saved for {state['num_samples']} samples and max_tokens="
                f"{state['max_tokens']}, this sampler has {len(self.lengths)} samples and max_tokens="
                f"{self.max_tokens}; the batch plans would differ"
            )
        # States saved before these keys existed lack them: nothing to compare then.
        if "shuffle" in state and bool(state["shuffle"]) != bool(self.shuffle):
            raise ValueError(f"hetrain: the sampler state was saved with shuffle={bool(state['shuffle'])}, this "
                             f"sampler has shuffle={bool(self.shuffle)}; the batch plans would differ: build it as "
                             "the saving run did")
        if "lengths_digest" in state and state["lengths_digest"] != self._lengths_digest:
            raise ValueError("hetrain: the sampler state was saved for other sample lengths (the same count, other "
                             "values or order: other data, or another tokenizer or windowing); the batch plans would "
                             "differ: resume with the data the saving run used")
        epoch, seed, position = (int(state[k]) for k in ("epoch", "seed", "position"))
        offset = int(state.get("offset", 0))
        # `offset` counts the samples of batch `position` consumed before the save: past the batch's end the resume
        # yielded an empty batch, at its end it went on as the next position does, a negative one skipped samples.
        plan = self._plan(epoch, seed)
        size = len(plan[position]) if position < len(plan) else 0
        if not 0 <= offset < max(size, 1):
            where = (f"is outside batch {position}'s {size} samples (need 0 <= offset < {size})" if size else
                     f"is past the epoch's end (position {position} of {len(plan)} batches needs offset 0)")
            raise ValueError(f"hetrain: the sampler state's offset {offset} {where}; the state was edited or comes "
                             "from another sampler: pass what state_dict() returned")
        self.epoch, self.seed = epoch, seed
        self._start = self._iter_start = position
        self._offset = self._iter_offset = offset
        self._yielded = 0  # state_dict() before the first resumed batch gives back exactly this position
        # Steps each saving rank had taken in the epoch (positions advance by num_replicas per step).
        self._resumed_steps = int(state.get("steps", self._start // int(state.get("num_replicas", 1))))
        self._plan_cache = (epoch, plan)


def _balanced(batches: list[np.ndarray], parts: int) -> tuple[list[np.ndarray], int]:
    """``batches`` made a multiple of ``parts`` long by halving the largest of the last batches; and how many
    batches at the end repeat earlier ones.

    A part of a batch stays within the budget. The ragged tail and the last full round are cut first,
    so the plan before them is untouched (unless they hold single samples only). Only when no batch has
    two samples are batches repeated from the start (as torch's DistributedSampler pads), so that every
    rank still takes a step.
    """
    out = list(batches)
    need = -len(out) % parts
    lo = max(0, len(out) - parts - len(out) % parts)
    for _ in range(need):
        k = max(range(lo, len(out)), key=lambda i: len(out[i]))
        if len(out[k]) < 2:  # the end holds single samples: cut the last batch that has two
            k = next((i for i in reversed(range(lo)) if len(out[i]) > 1), None)
            if k is None:
                break
        half = len(out[k]) // 2
        out[k : k + 1] = [out[k][:half], out[k][half:]]
    repeats = -len(out) % parts
    out += [out[i % len(batches)] for i in range(len(out), len(out) + repeats)]
    return out, repeats
