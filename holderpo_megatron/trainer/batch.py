"""What one training step carries, typed: the samples a rollout producer returns, and this DP rank's
batch that the Actor scores and trains on.

    StepSamples   rank 0's producers (single-turn prompts, agent episodes) -> broadcast to every rank
      .share(dp_rank, dp_size) -> this rank's StepSamples (whole trajectories, never cut)
      .to_batch(old_logprobs, ref_logprobs) -> RolloutBatch, what MegatronActor.forward_backward takes
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["StepSamples", "RolloutBatch", "trajectory_units", "prompt_units", "loss_mask", "rollout_logprobs_as_full"]


def loss_mask(length: int, response_start: int) -> torch.Tensor:
    """``[length-1]`` bool over next-token positions: True where the predicted token x_t is a response
    token (t >= response_start). Position t-1 predicts x_t, so the prompt (and every observation
    an agent's prompt holds) never enters the loss."""
    return torch.arange(1, length) >= response_start


def trajectory_units(n: int, trajectory: list[int] | None) -> list[list[int]]:
    """Indices of ``n`` samples grouped by trajectory id (first appearance order); None: singletons."""
    if trajectory is None:
        return [[i] for i in range(n)]
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(trajectory):
        groups.setdefault(t, []).append(i)
    return list(groups.values())


def prompt_units(sequences: list[list[int]], response_start: list[int]) -> list[list[int]]:
    """Indices of consecutive samples with the same prompt (a GRPO group), in order."""
    units: list[list[int]] = []
    for i, (s, r) in enumerate(zip(sequences, response_start)):
        if units and response_start[i - 1] == r and sequences[i - 1][:r] == s[:r]:
            units[-1].append(i)
        else:
            units.append([i])
    return units


def rollout_logprobs_as_full(lp: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Engine log-probs of a response, placed at next-token positions ``[n-1]`` (prompt positions: 0)."""
    full = torch.zeros(n - 1)
    full[start - 1:] = lp.float()
    return full


@dataclass
class StepSamples:
    """The samples of one step, as a rollout producer returns them (rank 0) and every rank receives.

    sequences: prompt + response token ids per sample; response_start: index of the first response
    token; rollout_logprobs: the engine's ``[len(response)]`` log-probs; advantages: one per sample;
    trajectory: the episode id of each sample for multi-turn agents (None: single-turn);
    metrics: the producer's step metrics (rewards, lengths, ...); examples: a few decoded responses.
    """

    sequences: list[list[int]] = field(default_factory=list)
    response_start: list[int] = field(default_factory=list)
    rollout_logprobs: list[torch.Tensor] = field(default_factory=list)
    advantages: list[float] = field(default_factory=list)
    trajectory: list[int] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def __post_init__(self):
        n = len(self.sequences)
        lengths = {len(self.response_start), len(self.rollout_logprobs), len(self.advantages)}
        if self.trajectory is not None:
            lengths.add(len(self.trajectory))
        if lengths != {n}:
            raise ValueError(f"StepSamples fields disagree: {n} sequences, {len(self.response_start)} response_start, "
                             f"{len(self.rollout_logprobs)} rollout_logprobs, {len(self.advantages)} advantages"
                             + ("" if self.trajectory is None else f", {len(self.trajectory)} trajectory ids"))

    def __len__(self) -> int:
        return len(self.sequences)

    def units(self, by_prompt: bool = False) -> list[list[int]]:
        """Samples that go to one rank (and one minibatch) together: a trajectory's turns; with
        ``by_prompt`` (single-turn), a prompt's group (``train.share_prompts``); else each alone."""
        if by_prompt and self.trajectory is None:
            return prompt_units(self.sequences, self.response_start)
        return trajectory_units(len(self.sequences), self.trajectory)

    def select(self, indices: list[int]) -> "StepSamples":
        """The samples at ``indices`` (metrics and examples stay with the whole step's batch)."""
        return StepSamples([self.sequences[i] for i in indices], [self.response_start[i] for i in indices],
                           [self.rollout_logprobs[i] for i in indices], [self.advantages[i] for i in indices],
                           None if self.trajectory is None else [self.trajectory[i] for i in indices])

    def share(self, dp_rank: int, dp_size: int, by_prompt: bool = False) -> "StepSamples":
        """This data-parallel rank's share: every ``dp_size``-th unit (a sample, a whole trajectory,
        or with ``by_prompt`` a prompt's group), starting at ``dp_rank``."""
        return self.share_units(dp_rank, dp_size, by_prompt)[0]

    def share_units(self, dp_rank: int, dp_size: int, by_prompt: bool = False) -> tuple["StepSamples", list[list[int]]]:
        """:meth:`share` and its units as indices into it. The units are cut once, over the whole
        step: two groups of one prompt that land on a rank next to each other stay two units."""
        mine = self.units(by_prompt)[dp_rank::dp_size]
        local, n = [], 0
        for u in mine:
            local.append(list(range(n, n + len(u))))
            n += len(u)
        return self.select([i for u in mine for i in u]), local

    def trim_to_multiple(self, dp_size: int) -> "StepSamples":
        """Drop the last units that do not divide evenly over ``dp_size`` ranks (metrics kept)."""
        units = self.units()
        out = self.select([i for u in units[: len(units) - len(units) % dp_size] for i in u])
        out.metrics, out.examples = self.metrics, self.examples
        return out

    def to_batch(self, old_logprobs: list[torch.Tensor | None], ref_logprobs: list[torch.Tensor] | None = None,
                 *, measure_drift: bool = False) -> "RolloutBatch":
        """``measure_drift``: the batch carries the engine's log-probs, for the training forward to
        measure its drift from them (see :class:`RolloutBatch`)."""
        return RolloutBatch(self.sequences, self.response_start, old_logprobs,
                            torch.tensor(self.advantages, dtype=torch.float32), ref_logprobs, self.trajectory,
                            self.rollout_logprobs_full() if measure_drift else None)

    def rollout_logprobs_full(self) -> list[torch.Tensor]:
        """The engine's log-probs at next-token positions ``[n-1]`` per sample (prompt: 0)."""
        return [rollout_logprobs_as_full(lp, s, len(q))
                for lp, s, q in zip(self.rollout_logprobs, self.response_start, self.sequences)]


@dataclass
class RolloutBatch:
    """What a training step consumes, for this data-parallel rank.

    sequences: token ids (prompt + response) per sample; response_start: index of the first
    response token per sample; old_logprobs: per sample ``[n-1]`` log-probs of the behaviour policy
    at next-token positions, or None where the behaviour policy is the one being trained (the first
    update after a weight sync): the training forward's own log-probs, detached, are the old ones
    (ratio 1); advantages: ``[num_samples]``; ref_logprobs: the reference policy's log-probs, like
    ``old_logprobs`` (needed when the KL coefficient is > 0); rollout_logprobs: the engine's log-probs
    at next-token positions ``[n-1]`` (:func:`rollout_logprobs_as_full`), given when the training
    forward should measure its drift from them (metrics ``logprob_drift_mean`` / ``_max``).

    trajectory: for multi-turn agents, the episode of each sample (one sample per turn; the turns
    of an episode share its advantage). The loss then reduces over every response token of a
    trajectory, across its turns, as one sequence (the Hölder mean spans the whole episode; the
    prompts, which hold the observations, are masked). None: every sample is its own sequence.
    """

    sequences: list[list[int]]
    response_start: list[int]
    old_logprobs: list[torch.Tensor | None]
    advantages: torch.Tensor
    ref_logprobs: list[torch.Tensor] | None = None
    trajectory: list[int] | None = None
    rollout_logprobs: list[torch.Tensor] | None = None

    def __post_init__(self):
        n = len(self.sequences)
        if not (len(self.response_start) == len(self.old_logprobs) == self.advantages.numel() == n):
            raise ValueError(
                f"RolloutBatch fields disagree: {n} sequences, {len(self.response_start)} response_start, "
                f"{len(self.old_logprobs)} old_logprobs, {self.advantages.numel()} advantages"
            )
        for i, (s, r, lp) in enumerate(zip(self.sequences, self.response_start, self.old_logprobs)):
            if not 1 <= r < len(s):
                raise ValueError(f"sample {i}: response_start={r} must be in [1, {len(s) - 1}]")
            if lp is not None and lp.numel() != len(s) - 1:
                raise ValueError(f"sample {i}: old_logprobs has {lp.numel()} values, expected {len(s) - 1}")
        if self.ref_logprobs is not None and len(self.ref_logprobs) != n:
            raise ValueError(f"RolloutBatch.ref_logprobs has {len(self.ref_logprobs)} entries for {n} sequences")
        if self.rollout_logprobs is not None:
            if len(self.rollout_logprobs) != n:
                raise ValueError(f"RolloutBatch.rollout_logprobs has {len(self.rollout_logprobs)} entries for {n} sequences")
            for i, (s, lp) in enumerate(zip(self.sequences, self.rollout_logprobs)):
                if lp.numel() != len(s) - 1:
                    raise ValueError(f"sample {i}: rollout_logprobs has {lp.numel()} values, expected {len(s) - 1}")
        if self.trajectory is not None:
            if len(self.trajectory) != n:
                raise ValueError(f"RolloutBatch.trajectory has {len(self.trajectory)} ids for {n} sequences")
            first: dict[int, float] = {}
            for i, t in enumerate(self.trajectory):
                a = float(self.advantages[i])
                if first.setdefault(t, a) != a:
                    raise ValueError(f"trajectory {t}: its turns carry different advantages ({first[t]} vs {a})")

    def units(self) -> list[list[int]]:
        """Sample indices that must stay together (one microbatch, one DP rank): a trajectory's
        turns, or each sample alone. In order of first appearance."""
        return trajectory_units(len(self.sequences), self.trajectory)

    def select(self, units: list[list[int]], *, measure_drift: bool = True) -> "RolloutBatch":
        """The sub-batch made of these units (lists of sample indices), trajectory ids kept; its
        ``rollout_logprobs`` too unless ``measure_drift`` is False."""
        idx = [i for u in units for i in u]

        def pick(xs):
            return None if xs is None else [xs[i] for i in idx]

        return RolloutBatch([self.sequences[i] for i in idx], [self.response_start[i] for i in idx],
                            pick(self.old_logprobs), self.advantages[idx], pick(self.ref_logprobs),
                            pick(self.trajectory), pick(self.rollout_logprobs) if measure_drift else None)
