"""HERON's preference reward model: a per-step reward network trained online from hierarchical comparisons.

The network maps (observation features, ranked reward factors) of one step to a scalar. A trajectory segment's
predicted return is the sum over its steps; pairs of segments are labelled by :mod:`~jaxrl_pref.rewards.hierarchy`
on their factor aggregates and the network is trained with the Bradley-Terry loss
``-log sigmoid(R_i - R_j)`` for "i preferred over j". Ties are skipped (``ties="skip"``, the paper's and the
reference code's choice) or trained towards probability 1/2 (``ties="half"``).

Everything lives in one pytree (:class:`PreferenceState`): network parameters, Adam state, a ring buffer of the
most recent segments, and running normalisation statistics, so training happens inside ``jit`` (and inside the
agent's ``lax.scan``). Each call of :meth:`PreferenceReward.update` (once per RL iteration):

1. cuts the rollout ``[T, N]`` into ``T // segment_len`` segments per env and appends them to the buffer (segments
   may straddle an episode boundary; their factors are still the sums/maxes of the steps they hold);
2. sets each factor's margin to ``sigma_mult * std`` of the segment aggregates in the buffer (paper) -- or uses
   ``sigma_mult`` as absolute margins -- optionally randomised per comparison;
3. runs ``rm_updates`` Adam steps, each on all ``B (B-1) / 2`` pairs of ``B = rm_batch_size`` segments drawn
   from the buffer (one vmapped comparison; ``B`` network passes, not ``B^2``);
4. updates the running mean/std of the model's per-step outputs on those minibatches (EMA with
   ``rm_norm_momentum``; as the reference code, which normalises by its outputs on the segments it trained on).

The reward the agent sees is ``reward_scale * (r - mean) / std`` (``rm_normalize=True``, as the paper recommends), or
the raw ``reward_scale * r``; it is 0 until the model has had its first update (``min_segments`` in the buffer).

Standalone use (no agent)::

    model = PreferenceReward(PreferenceConfig(), factor_set=factors.PENDULUM)
    state = model.init(key, spec)                       # spec: envs.EnvSpec (or anything with dummy_obs)
    state = model.add_segments(state, seg_obs, seg_factors)   # [S, L, D], [S, L, K_all]
    state, metrics = model.train(state, key)
    r = model.apply(state.params, obs, factors)         # per-step raw reward
    model.save("rm_ckpt", state); state = model.load("rm_ckpt", template=state)

As a :class:`~jaxrl_pref.rewards.RewardTransform`: ``agents.ppo.make_train(cfg, reward=model)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxrl_pref.config import ConfigError, in_range, positive, require
from jaxrl_pref.losses import bradley_terry_nll, rpo_penalty
from jaxrl_pref.networks import ACTIVATIONS, MLP
from envs.factors import FactorSet
from jaxrl_pref.rewards.factors import traj_factors
from jaxrl_pref.rewards.ensemble import AGGREGATIONS, aggregate
from jaxrl_pref.rewards.hierarchy import compare_all_pairs, random_margins, std_margins

TIES = ("skip", "half")


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """HERON reward-model settings (each is a CLI flag of ``experiments.heron``)."""
    factors: tuple[str, ...] = ()
    """Factor ranking, most important first (``--factors goal>energy`` or ``--factors goal energy``); empty: the
    factor set's default ranking."""
    margins: tuple[float, ...] = ()
    """One margin per ranked factor: a multiple of that factor's std over the buffer (paper's sigma_mult), or an
    absolute margin with --absolute-margins. Empty: 0 for the first factor, 1.0 for the others."""
    absolute_margins: bool = False
    random_margins: bool = False
    """Draw each comparison's margin as margin * U(margin_low, margin_high) (the paper's randomised margins)."""
    margin_low: float = 0.0
    margin_high: float = 2.0
    ties: str = "skip"
    """'skip': tied pairs carry no loss; 'half': tied pairs are trained towards P = 1/2."""
    segment_len: int = 4
    """Steps per compared segment (1 = compare single steps, as the reference's classic-control code)."""
    buffer_segments: int = 1024
    """Ring buffer capacity (segments); the most recent ones are kept."""
    rm_batch_size: int = 32
    """Segments per minibatch; all of their pairs are compared."""
    rm_updates: int = 8
    """Reward-model Adam steps per RL iteration."""
    min_segments: int = 64
    """Buffer fill before the model trains (its reward is 0 until then)."""
    rm_learning_rate: float = 1e-3
    rm_hidden: tuple[int, ...] = (64, 64)
    rm_activation: str = "relu"
    rm_use_obs: bool = True
    """Feed the observation to the reward network (else only the ranked factors)."""
    rm_normalize: bool = True
    """Normalise the model's reward by the running mean/std of its outputs on recent rollouts."""
    rm_norm_momentum: float = 0.9
    reward_scale: float = 1.0
    rm_ensemble: int = 1
    """Reward-model ensemble size K: K networks, differently initialised and each trained on its own minibatches
    of the shared buffer (vmapped in one jit), each normalised by its own output statistics; the reward is their
    --rm-aggregation (jaxrl_pref/rewards/ensemble.py, docs/guards.md). 1: one network."""
    rm_aggregation: str = "mean"
    """How the ensemble's K rewards make one: mean, min (worst case) or lcb (mean - --rm-lcb-coef * std)."""
    rm_lcb_coef: float = 1.0
    """lam of --rm-aggregation lcb."""
    rpo_coef: float = 0.0
    """RPO's reward penalty (docs/guards.md): the model also minimises rpo_coef * (its mean return on the current
    rollout's segments - its mean on the buffer's minibatch). 0: off."""

    def __post_init__(self):
        self.validate_rm()

    def validate_rm(self) -> None:
        positive(self, "segment_len", "buffer_segments", "rm_batch_size", "rm_updates", "rm_learning_rate",
                 "reward_scale")
        positive(self, "min_segments", "rm_lcb_coef", "rpo_coef", strict=False)
        require(self.rm_ensemble >= 1, "rm_ensemble", f"must be >= 1, got {self.rm_ensemble}",
                "pass --rm-ensemble 1 (one network) or e.g. 5")
        require(self.rm_aggregation in AGGREGATIONS, "rm_aggregation", f"unknown aggregation {self.rm_aggregation!r}",
                f"use one of {', '.join(AGGREGATIONS)}")
        in_range(self, "rm_norm_momentum", 0.0, 0.999999)
        require(self.rm_batch_size >= 2, "rm_batch_size",
                f"need at least 2 segments to compare, got {self.rm_batch_size}", "pass e.g. --rm-batch-size 32")
        require(self.ties in TIES, "ties", f"unknown tie handling {self.ties!r}", f"use one of {TIES}")
        require(self.rm_activation in ACTIVATIONS, "rm_activation", f"unknown activation {self.rm_activation!r}",
                f"use one of {sorted(ACTIVATIONS)}")
        require(len(self.rm_hidden) > 0 and all(h > 0 for h in self.rm_hidden), "rm_hidden",
                f"layer sizes must be positive, got {self.rm_hidden}", "pass e.g. --rm-hidden 64 64")
        require(all(m >= 0 for m in self.margins), "margins", f"margins must be >= 0, got {self.margins}",
                "pass non-negative values, e.g. --margins 0 1")
        require(0.0 <= self.margin_low <= self.margin_high, "margin_low",
                f"need 0 <= margin_low <= margin_high, got {self.margin_low}, {self.margin_high}",
                "pass e.g. --margin-low 0 --margin-high 2")
        require(self.min_segments <= self.buffer_segments, "min_segments",
                f"{self.min_segments} exceeds the buffer capacity {self.buffer_segments}",
                f"use at most --buffer-segments, e.g. --min-segments {min(64, self.buffer_segments)}")

    def validate_rollout(self, num_steps: int, num_envs: int) -> None:
        """Checks the segment settings against a rollout of ``num_steps`` x ``num_envs`` (the agent's)."""
        L = self.segment_len
        require(L <= num_steps, "segment_len", f"{L} is longer than a rollout (num_steps={num_steps})",
                f"use at most {num_steps}, e.g. --segment-len {min(4, num_steps)}")
        per_update = (num_steps // L) * num_envs
        require(per_update <= self.buffer_segments, "buffer_segments",
                f"one update adds {per_update} segments (num_steps // segment_len * num_envs) but the buffer holds "
                f"{self.buffer_segments}", f"use --buffer-segments {2 * per_update} or longer segments")

    def resolve(self, factor_set: FactorSet) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(ranking indices, one margin per ranked factor) for ``factor_set``; raises :class:`ConfigError` naming
        the bad field (unknown factor, margins length mismatch)."""
        names = _flatten_ranking(self.factors)
        try:
            order = factor_set.ranking(names)
        except KeyError as e:
            raise ConfigError("factors", str(e).strip("'\""),
                              f"rank some of {list(factor_set.names)}, e.g. --factors '"
                              f"{'>'.join(factor_set.default_ranking or factor_set.names)}'") from None
        margins = tuple(self.margins) if self.margins else (0.0,) + (1.0,) * (len(order) - 1)
        require(len(margins) == len(order), "margins",
                f"{len(margins)} margin(s) for {len(order)} ranked factor(s) "
                f"{[factor_set.names[i] for i in order]}",
                f"give one margin per ranked factor, e.g. --margins {' '.join(['0'] + ['1'] * (len(order) - 1))}")
        return order, margins


def _flatten_ranking(factors: Sequence[str]) -> tuple[str, ...]:
    from envs.factors import parse_ranking
    return parse_ranking(list(factors)) if factors else ()


def symlog(x):
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def obs_features(obs) -> jax.Array:
    """Float features ``[..., D]`` of a batch of observations: flat arrays as they are; dict observations
    (NetHack) by their symlog-scaled ``blstats``."""
    if isinstance(obs, dict):
        if "blstats" not in obs:
            raise ValueError(f"dict observations need a 'blstats' entry for the preference model; keys {sorted(obs)}")
        return symlog(jnp.asarray(obs["blstats"], jnp.float32))
    return jnp.asarray(obs, jnp.float32)


class StepReward(nn.Module):
    """Per-step reward network: MLP over [observation features, symlog(factors)] -> scalar."""
    hidden: Sequence[int] = (64, 64)
    activation: str = "relu"

    @nn.compact
    def __call__(self, obs_feat, factors):
        x = jnp.concatenate([obs_feat, symlog(factors)], axis=-1)
        h = MLP(tuple(self.hidden), self.activation)(x)
        return nn.Dense(1)(h)[..., 0]


@struct.dataclass
class PreferenceState:
    params: Any
    opt_state: Any
    seg_obs: jax.Array      # [C, L, D] buffer of segment observation features
    seg_factors: jax.Array  # [C, L, K_ranked] buffer of segment factors (ranked order)
    ptr: jax.Array          # next write position
    count: jax.Array        # valid segments in the buffer
    mean: jax.Array         # running mean of the model's outputs
    var: jax.Array          # running variance
    updates: jax.Array      # model updates done


def bt_loss(returns: jax.Array, labels: jax.Array, ties: str = "skip"):
    """Bradley-Terry loss over all pairs ``i < j`` of segment returns ``[B]`` with labels ``[B, B]`` (+1: i
    preferred, -1: j preferred, 0: tie). Returns ``(loss, metrics)``: the mean over counted pairs of
    ``-log sigmoid(y (R_i - R_j))``, with ties either skipped or given target 1/2
    (:func:`~jaxrl_pref.losses.bradley_terry_nll` with P(i preferred) = (y + 1) / 2)."""
    b = returns.shape[0]
    d = returns[:, None] - returns[None, :]
    upper = jnp.triu(jnp.ones((b, b), bool), k=1)
    y = labels.astype(jnp.float32)
    decided = upper & (labels != 0)
    counted = decided | (upper & (labels == 0)) if ties == "half" else decided
    n = counted.sum()
    # P(i preferred over j): 1, 0, or 1/2 for a tie (left out unless ties="half")
    loss = jnp.where(counted, bradley_terry_nll(d, (y + 1) / 2), 0.0).sum() / jnp.maximum(n, 1)
    n_dec = decided.sum()
    acc = jnp.where(decided, (y * d) > 0, False).sum() / jnp.maximum(n_dec, 1)
    return loss, {"accuracy": acc, "decided": n_dec / upper.sum(), "pairs": n}


def _gather_replicated(x, axis_name: str):
    """Concatenates every device's ``x`` along axis 0, typed as replicated (the same on every device) so that it
    can live in state that ``shard_map`` carries as replicated (``all_gather``'s result is typed per-device)."""
    n = jax.lax.psum(1, axis_name)
    full = jnp.zeros((n * x.shape[0],) + x.shape[1:], x.dtype)
    full = jax.lax.dynamic_update_slice_in_dim(full, x, jax.lax.axis_index(axis_name) * x.shape[0], 0)
    return jax.lax.psum(full, axis_name)


class PreferenceReward:
    """HERON's reward model: standalone (``init/apply/loss/add_segments/train/save/load``) and a RewardTransform
    (``init/update/__call__``). See the module docstring."""

    def __init__(self, cfg: PreferenceConfig, factor_set: FactorSet):
        self.cfg, self.factor_set = cfg, factor_set
        self.order, margins = cfg.resolve(factor_set)
        self.margins = jnp.asarray(margins, jnp.float32)
        self.net = StepReward(tuple(cfg.rm_hidden), cfg.rm_activation)
        self.tx = optax.adam(cfg.rm_learning_rate)
        ranked = [factor_set.factors[i] for i in self.order]
        self.directions = jnp.array([f.direction for f in ranked], jnp.float32)
        self._use_max = jnp.array([f.aggregate == "max" for f in ranked])

    @property
    def ranked_names(self) -> tuple[str, ...]:
        return tuple(self.factor_set.names[i] for i in self.order)

    # -- pieces ------------------------------------------------------------------------------------------------
    def ranked(self, factors: jax.Array) -> jax.Array:
        """All of the set's factors ``[..., K]`` -> the ranked ones, in rank order ``[..., K_ranked]``."""
        return jnp.take(jnp.asarray(factors, jnp.float32), jnp.asarray(self.order), axis=-1)

    def _feat(self, obs_feat):
        return obs_feat if self.cfg.rm_use_obs else jnp.zeros(obs_feat.shape[:-1] + (0,), jnp.float32)

    def apply(self, params, obs, factors, features: bool = False) -> jax.Array:
        """Raw per-step reward ``[...]`` for observations (or ``features=True``: already-computed observation
        features) and the set's factors ``[..., K]``."""
        feat = obs if features else obs_features(obs)
        return self.net.apply(params, self._feat(feat), self.ranked(factors))

    def _apply_ranked(self, params, feat, ranked_factors):
        return self.net.apply(params, self._feat(feat), ranked_factors)

    def aggregate(self, seg_factors):
        """Segment aggregates ``[..., K_ranked]`` of ranked per-step factors ``[..., L, K_ranked]``."""
        return jnp.where(self._use_max, seg_factors.max(-2), seg_factors.sum(-2))

    def labels(self, seg_factors, margins, key=None):
        """All-pairs hierarchical labels ``[B, B]`` (and deciding levels) for ranked segment factors
        ``[B, L, K_ranked]``; with ``cfg.random_margins`` and a ``key`` the margins are randomised per pair."""
        agg = self.aggregate(seg_factors)
        b = agg.shape[0]
        if self.cfg.random_margins and key is not None:
            margins = random_margins(key, margins, (b, b), self.cfg.margin_low, self.cfg.margin_high)
            margins = jnp.triu(margins.transpose(2, 0, 1), 1).transpose(1, 2, 0)
            margins = margins + margins.transpose(1, 0, 2)  # one draw per unordered pair: labels stay antisymmetric
        return compare_all_pairs(agg, margins, directions=self.directions)

    def loss(self, params, seg_feat, seg_factors, labels):
        """Bradley-Terry loss of the network on segments (features ``[B, L, D]``, ranked factors
        ``[B, L, K_ranked]``) with hierarchical ``labels`` ``[B, B]``."""
        r = self._apply_ranked(params, seg_feat, seg_factors)
        loss, metrics = bt_loss(r.sum(-1), labels, self.cfg.ties)
        # per-step output moments, for the normalisation statistics (the paper's "recent outputs")
        r = jax.lax.stop_gradient(r)
        return loss, {**metrics, "out_mean": r.mean(), "out_sq": jnp.square(r).mean()}

    def margins_now(self, state: PreferenceState) -> jax.Array:
        """Per ranked factor: ``sigma_mult * std`` of the buffer's segment aggregates, or the absolute margins."""
        if self.cfg.absolute_margins:
            return self.margins
        valid = jnp.arange(state.seg_factors.shape[0]) < state.count
        return std_margins(self.aggregate(state.seg_factors), self.margins, valid)

    # -- standalone API ----------------------------------------------------------------------------------------
    def init(self, key, spec, num_factors: Optional[int] = None) -> PreferenceState:
        """Fresh state; ``spec`` is an :class:`envs.EnvSpec` (or anything with ``dummy_obs(batch)``)."""
        feat_dim = obs_features(spec.dummy_obs(1)).shape[-1]
        k = len(self.order)
        K = self.cfg.rm_ensemble
        net_init = lambda kk: self.net.init(kk, self._feat(jnp.zeros((1, feat_dim))), jnp.zeros((1, k)))  # noqa
        params = net_init(key) if K == 1 else jax.vmap(net_init)(jax.random.split(key, K))
        opt = self.tx.init(params) if K == 1 else jax.vmap(self.tx.init)(params)
        stat = (lambda v: jnp.float32(v)) if K == 1 else (lambda v: jnp.full((K,), v, jnp.float32))
        c, L = self.cfg.buffer_segments, self.cfg.segment_len
        return PreferenceState(params, opt, jnp.zeros((c, L, feat_dim), jnp.float32),
                               jnp.zeros((c, L, k), jnp.float32), jnp.int32(0), jnp.int32(0), stat(0.0),
                               stat(1.0), jnp.int32(0))

    def add_segments(self, state: PreferenceState, seg_obs, seg_factors, features: bool = False):
        """Appends segments (observations ``[S, L, ...]`` and the set's factors ``[S, L, K]``) to the buffer."""
        feat = seg_obs if features else obs_features(seg_obs)
        ranked = self.ranked(seg_factors)
        s, c = ranked.shape[0], state.seg_factors.shape[0]
        if s > c:
            raise ValueError(f"buffer_segments: {s} segments per update do not fit a buffer of {c}; raise "
                             f"--buffer-segments to at least {s}")
        idx = (state.ptr + jnp.arange(s)) % c
        return state.replace(seg_obs=state.seg_obs.at[idx].set(feat), seg_factors=state.seg_factors.at[idx].set(ranked),
                             ptr=(state.ptr + s) % c, count=jnp.minimum(state.count + s, c))

    def train(self, state: PreferenceState, key, axis_name: Optional[str] = None, policy=None):
        """``rm_updates`` Adam steps on random minibatches of the buffer (skipped while it holds fewer than
        ``min_segments``). Gradients are averaged over ``axis_name`` (data-parallel devices). With ``rm_ensemble``
        K > 1 each network takes its own minibatches (vmapped). ``policy`` (``(features, ranked factors)`` of the
        current rollout's segments) with ``rpo_coef`` > 0 adds RPO's penalty: ``rpo_coef * (mean segment return on
        the policy's segments - mean on the minibatch)``."""
        cfg = self.cfg
        margins = self.margins_now(state)
        ready = state.count >= max(cfg.min_segments, 2)
        rpo = policy is not None and cfg.rpo_coef > 0

        def objective(params, feat, fac, labels):
            loss, m = self.loss(params, feat, fac, labels)
            if not rpo:
                return loss, m
            ret = lambda f, x: self._apply_ranked(params, f, x).sum(-1)  # noqa: E731
            pen = rpo_penalty(ret(*policy), jnp.ones(policy[0].shape[0]), ret(feat, fac), jnp.ones(feat.shape[0]))
            return loss + cfg.rpo_coef * pen, {**m, "rpo_penalty": pen}

        def step(carry, k):
            params, opt_state = carry
            k_idx, k_m = jax.random.split(k)
            idx = jax.random.randint(k_idx, (cfg.rm_batch_size,), 0, jnp.maximum(state.count, 1))
            feat, fac = state.seg_obs[idx], state.seg_factors[idx]
            labels, levels = self.labels(fac, margins, k_m)
            (loss, m), grads = jax.value_and_grad(objective, has_aux=True)(params, feat, fac, labels)
            if axis_name is not None:
                grads = jax.lax.pmean(grads, axis_name)
            updates, new_opt = self.tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ready, a, b), new, old)  # noqa: E731
            return (keep(new_params, params), keep(new_opt, opt_state)), {"loss": loss, **m}

        def fit(params, opt_state, k):
            (params, opt_state), metrics = jax.lax.scan(step, (params, opt_state), jax.random.split(k, cfg.rm_updates))
            return params, opt_state, jax.tree.map(lambda x: x.mean(0), metrics)

        if cfg.rm_ensemble == 1:
            params, opt_state, metrics = fit(state.params, state.opt_state, key)
        else:  # per member: its own minibatches; the normalisation statistics per member, the rest averaged
            params, opt_state, metrics = jax.vmap(fit)(state.params, state.opt_state,
                                                       jax.random.split(key, cfg.rm_ensemble))
            metrics = {k: v if k in ("out_mean", "out_sq") else v.mean(0) for k, v in metrics.items()}
        if axis_name is not None:
            metrics = jax.lax.pmean(metrics, axis_name)
        mean, sq = metrics.pop("out_mean"), metrics.pop("out_sq")
        out = {f"reward/heron_{k}": jnp.where(ready, v, jnp.nan) for k, v in metrics.items()}
        for name, m in zip(self.ranked_names, margins):
            out[f"reward/heron_margin_{name}"] = m
        # running normalisation statistics of the model's per-step outputs on the minibatches just trained on
        # (recent segments); the first trained update sets them, later ones are averaged in with rm_norm_momentum
        updates = state.updates + ready.astype(jnp.int32)
        mom = jnp.where(updates <= 1, 0.0, self.cfg.rm_norm_momentum)
        var = jnp.maximum(sq - mean ** 2, 0.0)
        mean = jnp.where(ready, mom * state.mean + (1 - mom) * mean, state.mean)
        var = jnp.where(ready, mom * state.var + (1 - mom) * var, state.var)
        state = state.replace(params=params, opt_state=opt_state, updates=updates, mean=mean, var=var)
        return state, out

    def save(self, directory, state: PreferenceState, step: int = 0) -> None:
        """Saves the state with orbax (atomic; see :mod:`jaxrl_pref.checkpoint`)."""
        from jaxrl_pref.checkpoint import Checkpointer
        ck = Checkpointer(directory, max_to_keep=1)
        try:
            ck.save(step, state, extra_json={"factors": list(self.ranked_names),
                                             "config": dataclasses.asdict(self.cfg)})
            ck.wait()
        finally:
            ck.close()

    def load(self, directory, template: PreferenceState) -> PreferenceState:
        from jaxrl_pref.checkpoint import Checkpointer
        ck = Checkpointer(directory)
        try:
            return ck.restore(target=template).state
        finally:
            ck.close()

    # -- RewardTransform ---------------------------------------------------------------------------------------
    def _segments(self, traj, factors):
        """Rollout ``[T, N, ...]`` -> segments ``[N * (T // L), L, ...]`` (features, factors)."""
        L = self.cfg.segment_len
        feat = obs_features(traj.obs)
        t, n = factors.shape[:2]
        m = t // L

        def cut(x):
            x = x[: m * L].reshape((m, L, n) + x.shape[2:])
            return jnp.swapaxes(x, 1, 2).reshape((m * n, L) + x.shape[3:])

        return cut(feat), cut(factors)

    def update(self, state: PreferenceState, traj, key, axis_name: Optional[str] = None):
        factors = traj_factors(self.factor_set, traj)
        feat, fac = self._segments(traj, factors)
        if axis_name is not None:  # every device keeps the same buffer: all segments of all devices
            feat, fac = _gather_replicated(feat, axis_name), _gather_replicated(fac, axis_name)
        state = self.add_segments(state, feat, fac, features=True)
        policy = None
        if self.cfg.rpo_coef > 0:  # RPO: this rollout's segments (a sample of a minibatch's size) as the policy's
            key, k = jax.random.split(key)
            pick = jax.random.randint(k, (self.cfg.rm_batch_size,), 0, feat.shape[0])
            policy = (feat[pick], self.ranked(fac[pick]))
        state, metrics = self.train(state, key, axis_name, policy)
        ext = traj.reward.mean()
        if axis_name is not None:
            ext = jax.lax.pmean(ext, axis_name)
        # logged here rather than in __call__, which has no device axis to average over
        return state, {**metrics, "reward/extrinsic": ext, "reward/heron_norm_mean": jnp.mean(state.mean),
                       "reward/heron_norm_std": jnp.mean(jnp.sqrt(state.var))}  # (over members: an ensemble's)

    def __call__(self, state: PreferenceState, traj):
        factors = traj_factors(self.factor_set, traj)
        if self.cfg.rm_ensemble == 1:
            r = self.apply(state.params, traj.obs, factors)
            if self.cfg.rm_normalize:
                r = (r - state.mean) / jnp.sqrt(state.var + 1e-8)
            return jnp.where(state.updates > 0, self.cfg.reward_scale * r, 0.0), {}
        feat = obs_features(traj.obs)  # once, not per member
        r = jax.vmap(lambda p: self.apply(p, feat, factors, features=True))(state.params)  # [K, T, N]
        if self.cfg.rm_normalize:
            shape = (-1,) + (1,) * (r.ndim - 1)
            r = (r - state.mean.reshape(shape)) / jnp.sqrt(state.var.reshape(shape) + 1e-8)
        out = aggregate(r, self.cfg.rm_aggregation, self.cfg.rm_lcb_coef)
        return (jnp.where(state.updates > 0, self.cfg.reward_scale * out, 0.0),
                {"reward/heron_ensemble_std": r.std(0).mean()})
