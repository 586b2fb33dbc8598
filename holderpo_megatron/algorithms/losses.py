"""Policy losses: HölderPO and the baselines, behind one registry.

Every loss takes ``[B, T]`` log-probs of the current policy (``logp``, with grad), of the behaviour
policy (``old_logp``, no grad), ``[B]`` advantages and a ``[B, T]`` response mask, and returns a
:class:`LossOutput`. The output carries the loss *and* its numerator/denominator
(``loss_sum``/``loss_count``) so microbatches and ranks combine exactly: the global loss is
``sum(loss_sum) / sum(loss_count)``; pass that global count as ``denominator`` to get each shard's
exact contribution (``parallel/`` does).

Every loss also takes an optional ``reducer`` (:mod:`.reducers`): the token layout. By default
tensors are padded ``[B, T]`` rows; with a reducer they are token-shaped for that layout (packed
sequences, a context-parallel shard) and ``advantages`` is ``[S]``, one per sequence of the reducer.
The loss code is the same for all layouts: it only sums, maxes and broadcasts through the reducer.

Each loss owns a typed, frozen options dataclass (:class:`LossOptions` and subclasses), validated
when it is built; a run builds it once from YAML (``algorithm.options``) and injects per step only
what a schedule changes (:meth:`LossOptions.at_p`). Adding a loss is one decorated function::

    @register_policy_loss("my_loss", options=ClipOptions)
    def my_loss(logp, old_logp, advantages, mask, options, *, denominator=None, strict=False,
                reducer=None) -> LossOutput: ...
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from .holder import _holder_log_ratio_masked, float_mask
from .metrics import LossMetrics
from .reducers import PaddedReducer, SequenceReducer

__all__ = [
    "LossOutput",
    "LossOptions",
    "ClipOptions",
    "HolderOptions",
    "GRPOOptions",
    "DrGRPOOptions",
    "GMPOOptions",
    "register_policy_loss",
    "policy_loss_options",
    "make_loss_options",
    "get_policy_loss",
    "policy_loss_names",
    "compute_policy_loss",
    "holder_policy_loss",
    "HOLDER_VARIANTS",
    "GRPO_AGGREGATIONS",
]

HOLDER_VARIANTS = ("seq", "token", "seq_tokclip")
GRPO_AGGREGATIONS = ("token-mean", "seq-mean-token-mean")


@dataclass
class LossOutput:
    """loss: scalar to backpropagate; loss_sum / loss_count: its exact numerator and denominator
    (count of sequences or tokens, per ``normaliser``); metrics: mergeable statistics."""

    loss: torch.Tensor
    loss_sum: torch.Tensor
    loss_count: torch.Tensor
    normaliser: str  # "sequence" or "token"
    metrics: LossMetrics


@dataclass(frozen=True)
class LossOptions:
    """A loss's options, built once and validated in ``__post_init__`` (ValueError naming the option).

    ``scheduled`` names the options a schedule sets per step (not settable from the config)."""

    scheduled: ClassVar[tuple[str, ...]] = ()

    def at_p(self, p: float) -> "LossOptions":
        """These options at power ``p`` of the p schedule; a loss without a power ignores it."""
        return self


@dataclass(frozen=True)
class ClipOptions(LossOptions):
    """PPO-style clip range ``[1 - clip_low, 1 + clip_high]``; ``dual_clip`` bounds the loss of a
    negative advantage at ``-A * dual_clip`` (None: off)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None

    def __post_init__(self):
        _check_clip(self.clip_low, self.clip_high, self.dual_clip)


@dataclass(frozen=True)
class HolderOptions(ClipOptions):
    """HölderPO: ``p`` is the power of the mean (set per step by the p schedule); ``variant`` is
    where the clip acts (see :func:`holder_policy_loss`)."""

    scheduled: ClassVar[tuple[str, ...]] = ("p",)
    p: float = 1.0
    variant: str = "seq"

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in HOLDER_VARIANTS:
            raise ValueError(f"variant must be one of {HOLDER_VARIANTS}, got {self.variant!r}")
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not math.isfinite(self.p):
            raise ValueError(f"p must be a finite number, got {self.p!r}")

    def at_p(self, p: float) -> "HolderOptions":
        return dataclasses.replace(self, p=p)


@dataclass(frozen=True)
class GRPOOptions(ClipOptions):
    aggregation: str = "token-mean"

    def __post_init__(self):
        super().__post_init__()
        if self.aggregation not in GRPO_AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {GRPO_AGGREGATIONS}, got {self.aggregation!r}")


@dataclass(frozen=True)
class DrGRPOOptions(ClipOptions):
    """``max_len``: the constant divisor (the generation budget); None: the layout's default (the
    tokens dimension of a padded batch; the Actor's packed layout carries ``rollout.max_new_tokens``)."""

    max_len: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.max_len is not None and (isinstance(self.max_len, bool) or not isinstance(self.max_len, int)
                                         or self.max_len <= 0):
            raise ValueError(f"max_len must be a positive int or None, got {self.max_len!r}")


@dataclass(frozen=True)
class GMPOOptions(LossOptions):
    """GMPO clips token ratios sign-aware; it has no dual clip."""

    clip_low: float = 0.2
    clip_high: float = 0.2

    def __post_init__(self):
        _check_clip(self.clip_low, self.clip_high, None)


@dataclass(frozen=True)
class _Registered:
    fn: Callable[..., LossOutput]
    options: type[LossOptions]


_POLICY_LOSSES: dict[str, _Registered] = {}


def register_policy_loss(name: str, options: type[LossOptions] = ClipOptions):
    """Decorator: make a loss selectable by ``name``, with ``options`` as its options dataclass.
    The loss is called as ``fn(logp, old_logp, advantages, mask, options, *, denominator, strict,
    reducer)``."""
    if not (isinstance(options, type) and issubclass(options, LossOptions)):
        raise ValueError(f"options of policy loss {name!r} must be a LossOptions subclass, got {options!r}")

    def deco(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        if name in _POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        _POLICY_LOSSES[name] = _Registered(fn, options)
        return fn

    return deco


def policy_loss_names() -> list[str]:
    return sorted(_POLICY_LOSSES)


def _lookup(name: str) -> _Registered:
    if name not in _POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; registered losses: {', '.join(policy_loss_names())}")
    return _POLICY_LOSSES[name]


def get_policy_loss(name: str) -> Callable[..., LossOutput]:
    return _lookup(name).fn


def policy_loss_options(name: str) -> type[LossOptions]:
    """The options dataclass registered with loss ``name``."""
    return _lookup(name).options


def make_loss_options(name: str, **options) -> LossOptions:
    """Loss ``name``'s options from keyword values; an option it does not have is refused, naming
    the ones it has."""
    cls = policy_loss_options(name)
    allowed = [f.name for f in dataclasses.fields(cls)]
    for k in options:
        if k not in allowed:
            raise ValueError(f"policy loss {name!r} does not take option {k!r}; it takes: {', '.join(allowed)}")
    return cls(**options)


def compute_policy_loss(name: str, logp, old_logp, advantages, mask, options: LossOptions | None = None, *,
                        denominator=None, strict: bool = False, reducer=None, **option_values) -> LossOutput:
    """Loss ``name`` with ``options`` (or options built from ``option_values``, for tests and
    one-off calls)."""
    reg = _lookup(name)
    if options is None:
        options = make_loss_options(name, **option_values)
    elif option_values:
        raise ValueError(f"pass either options or option values to policy loss {name!r}, not both")
    if not isinstance(options, reg.options):
        raise ValueError(f"policy loss {name!r} takes {reg.options.__name__}, got {type(options).__name__}")
    return reg.fn(logp, old_logp, advantages, mask, options, denominator=denominator, strict=strict, reducer=reducer)


# ----------------------------------------------------------------------------------------------
# Shared pieces


@dataclass
class _Batch:
    d: torch.Tensor  # token-shaped float32 log-ratio, 0 at masked/excluded positions, grad to logp
    mask: torch.Tensor  # token-shaped bool, valid tokens of counted sequences
    maskf: torch.Tensor  # the same mask as float32 0/1
    adv: torch.Tensor  # [S] float32
    adv_tok: torch.Tensor  # adv broadcast against tokens
    seq_valid: torch.Tensor  # [S] bool: counted (>= 1 valid token, all finite)
    seq_count: torch.Tensor  # [S] float32: valid tokens per sequence (0 for excluded sequences)
    n_nonfinite: torch.Tensor  # 0-dim: sequences dropped for non-finite inputs (as this rank reports)
    reducer: SequenceReducer


def _check_clip(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    if not (isinstance(clip_low, (int, float)) and 0.0 < clip_low < 1.0):
        raise ValueError(f"clip_low must be in (0, 1), got {clip_low!r}")
    if not (isinstance(clip_high, (int, float)) and math.isfinite(clip_high) and clip_high >= 0.0):
        raise ValueError(f"clip_high must be a finite number >= 0, got {clip_high!r}")
    if dual_clip is not None and not (isinstance(dual_clip, (int, float)) and dual_clip > 1.0):
        raise ValueError(f"dual_clip must be None or a number > 1, got {dual_clip!r}")


def _prepare(logp, old_logp, advantages, mask, strict: bool, reducer: SequenceReducer | None) -> _Batch:
    if reducer is None:
        for name, t in (("logp", logp), ("old_logp", old_logp)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise ValueError(f"{name} must be a floating [batch, tokens] tensor, got {_describe(t)}")
        reducer = PaddedReducer(logp.shape)
    else:
        if not isinstance(reducer, SequenceReducer):
            raise ValueError(f"reducer must be a SequenceReducer, got {type(reducer).__name__}")
        for name, t in (("logp", logp), ("old_logp", old_logp)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{name} must be a floating tensor, got {_describe(t)}")
        reducer.check_tokens("logp", logp)
    R = reducer
    if old_logp.shape != logp.shape:
        raise ValueError(f"old_logp shape {tuple(old_logp.shape)} does not match logp shape {tuple(logp.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.shape != logp.shape:
        raise ValueError(f"mask must have logp's shape {tuple(logp.shape)}, got {_describe(mask)}")
    n_seq = R.num_sequences
    if not isinstance(advantages, torch.Tensor) or advantages.shape not in ((n_seq,), (n_seq, 1)):
        raise ValueError(f"advantages must have shape [{n_seq}] (one per sequence), got {_describe(advantages)}")
    mask = mask.bool()
    member = R.token_member()
    if member is not None:
        mask = mask & member
    adv = advantages.reshape(-1).float().detach()
    old = old_logp.detach()
    maskf = float_mask(mask)
    # Multiplying by the mask (not selecting) is the fast path: a non-finite log-prob in a
    # sequence makes its sum non-finite, and only then do the exact per-token checks run. That
    # decision rests on per-sequence sums (global under context parallelism), so every rank takes
    # the same path through the collectives.
    d = (logp.float() - old.float()) * maskf
    count, d_sum = R.seq_sums(maskf, d.detach())
    bad = ~torch.isfinite(adv)
    # one host sync for all three checks
    seq_nonfinite, any_bad, local_nonfinite = torch.stack(
        [~torch.isfinite(d_sum).all(), bad.any(), ~torch.isfinite(d.detach().sum())]).tolist()
    if seq_nonfinite:
        finite = torch.isfinite(logp.detach()) & torch.isfinite(old)
        (n_bad_tok,) = R.seq_sums(float_mask(mask & ~finite))
        bad = bad | (n_bad_tok > 0)
        any_bad = bool(bad.any())
    if strict and any_bad:
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"non-finite log-probs or advantages in sequences {rows[:8]}{'...' if len(rows) > 8 else ''} "
            f"({len(rows)} of {n_seq}); strict=False excludes them instead"
        )
    if any_bad:
        mask = mask & ~R.broadcast(bad)
        maskf = float_mask(mask)
        count = torch.where(bad, torch.zeros_like(count), count)
        adv = torch.where(bad, torch.zeros_like(adv), adv)
    if any_bad or local_nonfinite:
        # NaN/inf at padding (or tokens of no sequence) or excluded sequences: select instead, so
        # none reaches the loss or its gradient (a local choice: no collective follows it)
        d = torch.where(mask, logp.float() - old.float(), torch.zeros((), device=logp.device))
    return _Batch(
        d=d, mask=mask, maskf=maskf, adv=adv, adv_tok=R.broadcast(adv), seq_valid=count > 0, seq_count=count,
        n_nonfinite=R.total(bad.double()), reducer=R,
    )


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
    return f"{type(t).__name__}"


def _finish(loss_sum, loss_count, denominator, normaliser: str, metrics: LossMetrics) -> LossOutput:
    loss_count = loss_count.detach().float()
    if denominator is None:
        denom = loss_count.clamp_min(1.0)
    else:
        # A Python number is checked here; a tensor (e.g. an all-reduced count) is trusted, to
        # avoid a device sync on the hot path.
        if not isinstance(denominator, torch.Tensor) and not denominator > 0:
            raise ValueError(f"denominator must be > 0, got {denominator!r}")
        denom = torch.as_tensor(denominator, dtype=loss_sum.dtype, device=loss_sum.device)
    return LossOutput(loss_sum / denom, loss_sum, loss_count, normaliser, metrics)


def _sequence_clip(log_rho, adv, seq_valid, clip_low, clip_high, dual_clip):
    """PPO clip on a per-sequence ratio. Returns (per-sequence loss [B], rho [B], clipped [B])."""
    rho = torch.exp(log_rho)
    unclipped = -adv * rho
    clipped_obj = -adv * rho.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_seq = torch.maximum(unclipped, clipped_obj)
    if dual_clip is not None:
        per_seq = torch.where(adv < 0, torch.minimum(per_seq, -adv * dual_clip), per_seq)
    per_seq = torch.where(seq_valid, per_seq, torch.zeros_like(per_seq))
    clipped = seq_valid & (clipped_obj > unclipped)
    return per_seq, rho, clipped


class _FlaggedClamp(torch.autograd.Function):
    """``d`` (log-ratios or ratios) clamped to ``[lo, hi]`` (tensors broadcasting against it), and
    the clipped tokens as 0/1 float; the gradient passes where the clamp left ``d`` unchanged, as
    ``torch.clamp``'s does. One multiply-add in backward, where clamp with tensor bounds and selects
    by sign each take a slow element-wise path on CPU."""

    @staticmethod
    def forward(ctx, d, lo, hi):
        d_clip = torch.maximum(torch.minimum(d, hi), lo)
        # exactly 0 or 1; inf - inf (an overflowed ratio left unclamped) is NaN, which means kept
        clipped = (d - d_clip).abs_().sign_().nan_to_num_(0.0)
        ctx.save_for_backward(clipped)
        ctx.mark_non_differentiable(clipped)
        return d_clip, clipped

    @staticmethod
    def backward(ctx, grad, _):
        (clipped,) = ctx.saved_tensors
        return torch.addcmul(grad, grad, clipped, value=-1.0), None, None


def _sign_aware_token_clip(b: _Batch, clip_low, clip_high):
    """Per token, in log space: A > 0 keeps min(r, clip(r)) = min(r, 1+eps_h);
    A < 0 keeps max(r, clip(r)) = max(r, 1-eps_l). Returns (clipped d, clipped tokens as 0/1 float,
    0 off the mask since d is 0 there)."""
    hi, lo = math.log1p(clip_high), math.log1p(-clip_low)
    inf = torch.full_like(b.adv, math.inf)
    lo_seq = torch.where(b.adv < 0, torch.full_like(b.adv, lo), -inf)
    hi_seq = torch.where(b.adv > 0, torch.full_like(b.adv, hi), inf)
    return _FlaggedClamp.apply(b.d, b.reducer.broadcast(lo_seq), b.reducer.broadcast(hi_seq))


def _seq_metrics(batch: _Batch, rho, clipped, p: float | None) -> LossMetrics:
    R = batch.reducer
    m = LossMetrics()
    valid_f = batch.seq_valid.double()
    n = R.total(valid_f)
    m.add_mean("rho_mean", R.total(rho.detach().double() * valid_f), n)
    m.add_extreme("rho", rho, batch.seq_valid)
    m.add_mean("clip_frac", R.total(clipped.double()), n)
    zero_grad = batch.seq_valid & (clipped | (batch.adv == 0))
    m.add_mean("zero_grad_frac", R.total(zero_grad.double()), n)
    m.add_total("nonfinite_seqs", batch.n_nonfinite)
    m.add_total("num_seqs", n)
    if p is not None:
        m.add_constant("p", p)
    return m


# ----------------------------------------------------------------------------------------------
# HölderPO


@register_policy_loss("holder", options=HolderOptions)
def holder_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    options: HolderOptions,
    *,
    denominator: float | torch.Tensor | None = None,
    strict: bool = False,
    reducer: SequenceReducer | None = None,
) -> LossOutput:
    """HölderPO loss, averaged over sequences with at least one valid token.

    variant:
      * ``seq``: rho_i = Hölder_p mean of r_t; loss_i = max(-A_i rho_i, -A_i clip(rho_i)).
      * ``token``: loss_i = -A_i * Hölder_p mean of the sign-aware clipped token ratios
        (min(r_t, clip(r_t)) for A_i > 0, max(r_t, clip(r_t)) for A_i < 0).
      * ``seq_tokclip``: d_t clamped to [log(1-clip_low), log(1+clip_high)] before the mean, then ``seq``.
    Sequences with a non-finite log-prob at a valid position (or a non-finite advantage) are left
    out of the loss and counted in ``nonfinite_seqs``; ``strict=True`` raises instead.
    ``reducer``: the token layout (default padded ``[B, T]``; see the module docstring).
    """
    p, variant = options.p, options.variant
    clip_low, clip_high, dual_clip = options.clip_low, options.clip_high, options.dual_clip
    b = _prepare(logp, old_logp, advantages, mask, strict, reducer)
    R = b.reducer

    if variant == "token":
        d_clip, active = _sign_aware_token_clip(b, clip_low, clip_high)
        rho = torch.exp(_holder_log_ratio_masked(d_clip, b.maskf, p, R))
        per_seq = torch.where(b.seq_valid, -b.adv * rho, torch.zeros_like(rho))
        tok_clipped = R.seq_sum(active)
        all_clipped = b.seq_valid & (tok_clipped == b.seq_count)
        metrics = _seq_metrics(b, rho, all_clipped, p)
        metrics.add_mean("token_clip_frac", R.total(tok_clipped.double()), R.total(b.seq_count.double()))
    else:
        d = b.d
        if variant == "seq_tokclip":
            bound = torch.tensor([math.log1p(-clip_low), math.log1p(clip_high)], device=d.device)
            d, tok_active = _FlaggedClamp.apply(d, bound[0], bound[1])
        per_seq, rho, clipped = _sequence_clip(_holder_log_ratio_masked(d, b.maskf, p, R), b.adv, b.seq_valid, clip_low, clip_high, dual_clip)
        metrics = _seq_metrics(b, rho, clipped, p)
        if variant == "seq_tokclip":
            # per-token sums are over this shard's tokens: they add up across ranks as they are
            metrics.add_mean("token_clip_frac", tok_active.sum(), b.maskf.sum())
    return _finish(R.total(per_seq), R.total(b.seq_valid.float()), denominator, "sequence", metrics)


# ----------------------------------------------------------------------------------------------
# Baselines


def _token_ppo(b: _Batch, clip: ClipOptions):
    """Per-token PPO objective (token-shaped, 0 at masked positions), token ratios and clipped
    tokens (0/1 float). max(-A r, -A clip(r)) is -A times r clamped sign-aware (above only for
    A > 0, below only for A < 0), with no gradient where the clamp acts: one clamp pass."""
    ratio = torch.exp(b.d)
    inf = torch.full_like(b.adv, math.inf)
    lo_seq = torch.where(b.adv < 0, torch.full_like(b.adv, 1.0 - clip.clip_low), -inf)
    hi_seq = torch.where(b.adv > 0, torch.full_like(b.adv, 1.0 + clip.clip_high), inf)
    R = b.reducer
    kept, clipped = _FlaggedClamp.apply(ratio, R.broadcast(lo_seq), R.broadcast(hi_seq))
    per_tok = kept * R.broadcast(-b.adv)
    if clip.dual_clip is not None:
        adv = b.adv_tok
        per_tok = torch.where(adv < 0, torch.minimum(per_tok, -adv * clip.dual_clip), per_tok)
    # off the mask the ratio is 1, inside every bound, but a packed layout broadcasts 0 bounds to
    # tokens of no sequence
    return per_tok * b.maskf, ratio, clipped * b.maskf


def _token_metrics(b: _Batch, ratio, clipped) -> LossMetrics:
    R = b.reducer
    m = LossMetrics()
    n_tok = b.maskf.sum(dtype=torch.float64)
    m.add_mean("rho_mean", (ratio.detach() * b.maskf).sum(dtype=torch.float64), n_tok)
    # ratio = exp(d) is monotone, so its extremes are those of d over valid tokens; d is finite and
    # 0 off the mask, where a -/+ float max penalty (0 on the mask, exactly) keeps it out.
    d = b.d.detach()
    pen = b.maskf.mul(torch.finfo(d.dtype).max).sub_(torch.finfo(d.dtype).max)
    none = n_tok == 0
    inf = torch.tensor(math.inf, dtype=torch.float64, device=d.device)
    m.add_min_max("rho", torch.where(none, inf, torch.exp((d - pen).amin()).double()),
                  torch.where(none, -inf, torch.exp((d + pen).amax()).double()))
    m.add_mean("clip_frac", clipped.sum(dtype=torch.float64), n_tok)
    # a sequence gets no gradient when none of its valid tokens is unclipped (or A = 0); clipped is
    # 0 off the mask
    n_unclipped = R.seq_sum(b.maskf - clipped)
    zero_grad = b.seq_valid & ((n_unclipped == 0) | (b.adv == 0))
    n = R.total(b.seq_valid.double())
    m.add_mean("zero_grad_frac", R.total(zero_grad.double()), n)
    m.add_total("nonfinite_seqs", b.n_nonfinite)
    m.add_total("num_seqs", n)
    return m


@register_policy_loss("grpo", options=GRPOOptions)
def grpo_loss(logp, old_logp, advantages, mask, options: GRPOOptions, *, denominator=None, strict: bool = False,
              reducer=None) -> LossOutput:
    """Token-level PPO clip. ``token-mean``: mean over all valid tokens of the batch;
    ``seq-mean-token-mean``: mean over sequences of each sequence's token mean."""
    b = _prepare(logp, old_logp, advantages, mask, strict, reducer)
    R = b.reducer
    per_tok, ratio, clipped = _token_ppo(b, options)
    metrics = _token_metrics(b, ratio, clipped)
    if options.aggregation == "token-mean":
        return _finish(per_tok.sum(), b.maskf.sum(), denominator, "token", metrics)
    per_seq = R.seq_sum(per_tok) / b.seq_count.clamp_min(1)
    return _finish(R.total(per_seq), R.total(b.seq_valid.float()), denominator, "sequence", metrics)


@register_policy_loss("dr_grpo", options=DrGRPOOptions)
def dr_grpo_loss(logp, old_logp, advantages, mask, options: DrGRPOOptions, *, denominator=None, strict: bool = False,
                 reducer=None) -> LossOutput:
    """Dr. GRPO: each sequence's token sum divided by a constant ``max_len`` (the generation
    budget; default the tokens dimension of the padded layout, or the layout's ``default_max_len``),
    then mean over sequences."""
    max_len = options.max_len
    if max_len is None:
        max_len = mask.shape[-1] if reducer is None else reducer.default_max_len
        if max_len is None:
            raise ValueError(
                f"dr_grpo needs max_len (the generation budget) with a {type(reducer).__name__} layout, got None"
            )
    b = _prepare(logp, old_logp, advantages, mask, strict, reducer)
    per_tok, ratio, clipped = _token_ppo(b, options)
    metrics = _token_metrics(b, ratio, clipped)
    return _finish(per_tok.sum() / max_len, b.reducer.total(b.seq_valid.float()), denominator, "sequence", metrics)


@register_policy_loss("gspo", options=ClipOptions)
def gspo_loss(logp, old_logp, advantages, mask, options: ClipOptions, *, denominator=None, strict: bool = False,
              reducer=None) -> LossOutput:
    """GSPO: geometric-mean sequence ratio exp(mean_t d_t) with a sequence clip."""
    b = _prepare(logp, old_logp, advantages, mask, strict, reducer)
    R = b.reducer
    log_rho = R.seq_sum(b.d) / b.seq_count.clamp_min(1)
    per_seq, rho, clipped = _sequence_clip(log_rho, b.adv, b.seq_valid, options.clip_low, options.clip_high,
                                           options.dual_clip)
    return _finish(R.total(per_seq), R.total(b.seq_valid.float()), denominator, "sequence", _seq_metrics(b, rho, clipped, None))


@register_policy_loss("gmpo", options=GMPOOptions)
def gmpo_loss(logp, old_logp, advantages, mask, options: GMPOOptions, *, denominator=None, strict: bool = False,
              reducer=None) -> LossOutput:
    """GMPO: -A * geometric mean of the sign-aware token-clipped ratios. (The GMPO paper's default
    range is wider, (e^-0.4, e^0.4): set clip_low = 1 - e^-0.4, clip_high = e^0.4 - 1 for it.)"""
    b = _prepare(logp, old_logp, advantages, mask, strict, reducer)
    R = b.reducer
    d_clip, active = _sign_aware_token_clip(b, options.clip_low, options.clip_high)
    d_sum, tok_clipped = R.seq_sums(d_clip, active)  # both 0 off the mask
    rho = torch.exp(d_sum / b.seq_count.clamp_min(1))
    per_seq = torch.where(b.seq_valid, -b.adv * rho, torch.zeros_like(rho))
    metrics = _seq_metrics(b, rho, b.seq_valid & (tok_clipped == b.seq_count), None)
    metrics.add_mean("token_clip_frac", R.total(tok_clipped.double()), R.total(b.seq_count.double()))
    return _finish(R.total(per_seq), R.total(b.seq_valid.float()), denominator, "sequence", metrics)
