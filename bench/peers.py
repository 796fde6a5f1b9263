"""Peer caches for the benchmark: diffusers' FirstBlockCache, TaylorSeer and MagCache hooks, cache-dit's DBCache.

``benchmark.run_model`` calls :func:`peer_rows` and records every ``(label, family, make, extra)`` it yields with
``bench.row``. Each peer is applied, unchanged, to the transformer of our pipeline (batched CFG, FlowMatchEuler) and
swept over its main knob so that the rows span roughly 30–70 % compute.

What each row measures and how the peers are wired (all found by reading the peers' code, diffusers 0.42.1 and
cache-dit 1.5.3):

* **compute** is measured, not assumed: every ``nn.Linear`` inside the block stack (``transformer_blocks`` and, for
  Flux, ``single_transformer_blocks``) gets a counting ``forward`` (installed before the peer, so the peer calls it
  as the "original" and a skipped or forecast module never reaches it) that adds up the matmul FLOPs that really ran
  (rows × in × out); the sum is divided by the FLOPs of the full block stack for the same number of transformer rows
  (measured once on an unhooked copy). So it counts what the peer computed, including what a peer always runs
  (FirstBlockCache's and DBCache's first block) and what a module-level cache leaves running (TaylorSeer: adaLN,
  norms). Attention score/softmax FLOPs are not counted (about 6 % of a block at 49 tokens; skipped together with
  their module). ``last_block_runs`` is the fraction of transformer rows for which the last block's last Linear ran
  (= the fraction of fully computed steps for block-level caches). Both come from the evaluation run only (the first
  ``ceil(samples / batch)`` pipeline calls), not from the timing runs.
* **state per call**: our pipeline is not a diffusers pipeline with ``cache_context`` and never calls
  ``maybe_free_model_hooks``, so diffusers' stateful hooks would carry their state from one batch to the next:
  TaylorSeer's step counter runs on (a second identical call differs by up to 1.9 on [-1, 1] images),
  FirstBlockCache compares the first step with the last batch's residual and crashes when the next batch is smaller,
  MagCache resets itself only after ``num_inference_steps`` transformer calls; FirstBlockCache and TaylorSeer raise
  "No cache context is set" without a context (MagCache sets its own). Each peer pipeline therefore gets a private
  subclass whose ``__call__`` runs ``HookRegistry.reset_stateful_hooks()`` and sets one ``CacheContext`` (CFG is
  batched) before the call, and resets again after it. cache-dit resets its contexts per call itself by wrapping
  ``type(pipe).__call__`` -- on the class, so it is applied to the private subclass (else it would patch
  ``MNISTDiTPipeline`` for every later pipeline, the full-run timing baseline included).
* **warm-up**: every peer that has a warm-up knob gets the same one as the fixed-schedule baselines of the
  benchmark, ``max(3, ceil(0.1 (N - 1)))`` computed steps (= TaylorSeer's default 3 for N ≤ 28).
* **threshold knobs** (FirstBlockCache, MagCache, DBCache) are picked per model and step count: a log-space search
  on a probe batch of other seeds (``PROBE_SEED0`` …) finds the threshold whose compute is closest to each of
  ``TARGETS``; the label carries the threshold, the row the measured compute.

Peers:

* ``diffusers FBCache t=…`` — ``apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold))``. It finds
  the blocks by the child names in ``diffusers.hooks._common._ALL_TRANSFORMER_BLOCK_IDENTIFIERS``
  (``transformer_blocks``, ``single_transformer_blocks``, ``blocks``, ``layers``, …, each an ``nn.ModuleList``) and
  the block's output layout from ``TransformerBlockRegistry`` (``BasicTransformerBlock`` and both Flux blocks are
  registered), so it works on ``DiTTransformer2DModel`` (which has no ``enable_cache``: it is not a ``CacheMixin``)
  and on ``FluxTransformer2DModel`` (head = ``transformer_blocks.0``, tail = ``single_transformer_blocks.3``). It
  needs a cache context (``StateManager.get_state`` raises without one).
* ``diffusers TaylorSeer k=…`` — ``apply_taylorseer_cache`` with ``cache_interval`` k, ``max_order=1`` (order 2 was
  worse at every k in 8-sample checks on both models, e.g. DiT N=20: 39.4 vs 47.9 dB at k=2),
  ``taylor_factors_dtype=float32`` (the default bfloat16 would add rounding to a float32 model) and identifiers that
  match our modules: the default patterns (``^transformer_blocks.*attn``, ``re.fullmatch``) match nothing in DiT
  (its attention is ``attn1``) and only the attention in Flux. See :func:`taylorseer_identifiers` (module level, the
  paper's units: DiT ``attn1`` + ``ff``; Flux ``attn``/``ff``/``ff_context`` and the single blocks' ``proj_out``
  with ``attn``/``proj_mlp`` skipped). ``BLOCK_LEVEL_TAYLORSEER`` forecasts whole block outputs instead (within ±1.7
  dB of module level on both models, neither consistently better).
* ``diffusers MagCache t=…`` — ``apply_mag_cache``; ``mag_ratios`` are calibrated first with ``calibrate=True`` on
  the same model and N (probe seeds), read from the list the hook prints. ``retention_ratio`` = warm-up / N,
  ``max_skip_steps`` = 3 (default).
* ``cache-dit DBCache F1B0 MC… t=…`` and ``cache-dit DBCache+TaylorSeer F1B0 MC… t=…`` — ``cache_dit.enable_cache``
  with a ``BlockAdapter`` around our pipeline that mirrors cache-dit's own DiT / Flux adapters (DiT: ``Pattern_3`` +
  ``DiTPatchFunctor``; Flux: both block lists concatenated, ``Pattern_1`` + ``FluxPatchFunctor``; cache-dit
  registers those for pipeline classes named ``DiT*`` / ``Flux*``, which ours are not, so the registered adapters
  are not picked up automatically), ``DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0,
  max_warmup_steps=warm-up, max_continuous_cached_steps=MC, residual_diff_threshold=t, enable_separate_cfg=False,
  num_inference_steps=N)``; the second adds ``TaylorSeerCalibratorConfig(taylorseer_order=1)``. MC = 3 (SGLang's
  cache-dit default, MagCache's K; better than no limit at equal compute: DiT N=20, 16 samples, 0.46 compute: 28.6
  vs 25.0 dB, with TaylorSeer 33.3 vs 26.7 dB) wherever it reaches a target within 0.05; its floor is about 45 %
  compute (the first block always runs: 1/6 of the stack), so lower targets use cache-dit's default, no limit
  (``MC-``). With threshold 0 both patch functors reproduce the unpatched model bit for bit (checked). cache-dit's
  attention-backend auto-selection does nothing on CPU, and diffusers' attention registry is left as it was
  (checked).
* ``cache-dit DBCache+DMD F1B0 MC… t=…`` and ``cache-dit DBCache+FoCa F1B0 MC… t=…`` — the same DBCache with the
  two other calibrators cache-dit ships, at their defaults: ``DMDCalibratorConfig()`` (dynamic mode decomposition,
  i.e. SVD-regularised Prony's method: an exponential basis fitted to the last 6 computed residuals, automatic rank,
  a Taylor fallback below 4 snapshots) and ``FoCaCalibratorConfig()`` (a BDF2 forecast with a Heun-style corrector
  on the two newest values, no knobs). Their thresholds are searched for the compute of the TC-Padé preset rows at
  the same step count (``preset_targets``: measured, from the results; the presets' budgets before those rows
  exist) rather than ``TARGETS``, so that each lands beside a preset.

``mnist-wan`` (``WanTransformer3DModel``, CFG as two transformer calls per step, each in
``transformer.cache_context("cond" / "uncond")`` as ``WanPipeline`` does): the block stack is ``blocks`` (one of
``_ALL_TRANSFORMER_BLOCK_IDENTIFIERS``) and ``WanTransformerBlock`` is in ``TransformerBlockRegistry`` (hidden states
at index 0, no encoder output), so FirstBlockCache and MagCache apply unchanged; each keeps one state per cache
context, i.e. the conditional and unconditional branches decide and cache separately, as in diffusers' own
WanPipeline. TaylorSeer gets ``blocks.N.(attn1|attn2|ffn)`` (its default patterns match nothing in Wan). MagCache's
calibration prints one ratio list per context; their mean is used. cache-dit: the adapter it registers for
``Wan*`` pipelines (``ForwardPattern.Pattern_2``, no patch functor, ``has_separate_cfg=True``), with
``enable_separate_cfg=True`` (the conditional call first, as in our pipeline and cache-dit's default).

Limits: every peer here takes one skip decision per transformer call, i.e. for the whole batch (both CFG halves,
all images). The probe batch (``PROBE_SAMPLES`` images) is smaller than the benchmark's batches, so a row's measured
compute can differ from its ``probe_compute`` by a step or so. TaylorSeer's interval knob is discrete: k = 2, 3, 4
gives about 55, 45, 35 % (N = 20), nothing near 65 %. The counting wrappers run in the peer pipelines only, not in
the full-run timing baseline (about 50 Python calls per transformer call; not measurable above timing noise on a
4-image, 20-step DiT run).

Installing cache-dit: ``pip install cache-dit`` (1.5.3) installs only the ``cache_dit`` wheel here; every dependency
(torch>=2.7.1, diffusers>=0.36, transformers>=4.55.2, …) is already satisfied by torch 2.13 / diffusers 0.42.1, and
``pip check`` stays clean. Without it the cache-dit rows are left out (with a note on stderr).
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import os
import re
import sys
from typing import Callable, Iterator

import torch
from torch import nn

TARGETS = (0.35, 0.5, 0.65)
PROBE_SAMPLES = 8
PROBE_SEED0 = 10_000
WARMUP_FRACTION = 0.1
TAYLORSEER_INTERVALS = (2, 3, 4)
BLOCK_LEVEL_TAYLORSEER = False
DBCACHE_MAX_CONTINUOUS = (3, -1)  # preferred first
FAMILY = "peer"


# -- plumbing --------------------------------------------------------------------------------------------------
def warmup_steps(n: int) -> int:
    return min(n, max(3, math.ceil(WARMUP_FRACTION * (n - 1))))


def _bench_module(bench):
    return sys.modules[type(bench).__module__]


def _scheduler(bench):
    if hasattr(bench, "euler"):  # benchmark.Bench: Euler at the model's time shift
        return bench.euler()
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def _guidance(bench) -> float:
    return getattr(bench, "guidance", None) or getattr(_bench_module(bench), "GUIDANCE", 1.5)


def _latents(bench, seeds: list[int]) -> torch.Tensor:
    from tcpade_fx import metrics

    return bench.latents_for(seeds) if hasattr(bench, "latents_for") else metrics.seeded_latents(seeds)


def is_wan(transformer: nn.Module) -> bool:
    from diffusers import WanTransformer3DModel

    return isinstance(transformer, WanTransformer3DModel)


def block_lists(transformer: nn.Module) -> list[nn.ModuleList]:
    return [getattr(transformer, name) for name in ("transformer_blocks", "single_transformer_blocks", "blocks")
            if isinstance(getattr(transformer, name, None), nn.ModuleList)]


def blocks_of(transformer: nn.Module) -> list[nn.Module]:
    return [block for blocks in block_lists(transformer) for block in blocks]


class ComputeMeter:
    """Counts the Linear FLOPs that actually ran in the block stack, and the transformer rows they were for.

    It wraps each Linear's ``forward`` (an instance attribute) instead of using a forward hook: a hook fires on
    ``module(...)`` even when a diffusers hook on that same Linear (TaylorSeer on ``proj_out``) returns a prediction
    instead of running it; a wrapped forward installed *before* the peer is what the peer calls as "original".
    """

    def __init__(self, transformer: nn.Module, full_per_row: float | None = None):
        self.full_per_row = full_per_row
        self.flops = 0
        self.rows = 0
        self.last_rows = 0
        self.calls = 0
        blocks = blocks_of(transformer)
        if not blocks:
            raise ValueError(f"no transformer_blocks / single_transformer_blocks / blocks in {type(transformer).__name__}")
        linears = [m for block in blocks for m in block.modules() if isinstance(m, nn.Linear)]
        last = [m for m in blocks[-1].modules() if isinstance(m, nn.Linear)][-1]
        for module in linears:
            module.forward = self._counting(module, module.forward, module is last)
        self.handle = transformer.register_forward_pre_hook(self._call, with_kwargs=True)

    def _counting(self, module: nn.Linear, forward, is_last: bool):
        out_features = module.out_features

        def counted(x, *args, **kwargs):
            self.flops += x.numel() * out_features
            if is_last:
                self.last_rows += x.shape[0]
            return forward(x, *args, **kwargs)

        return counted

    def _call(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.rows += x.shape[0]

    def summary(self) -> dict:
        if not self.rows:
            return {}
        return {"compute": self.flops / (self.full_per_row * self.rows),
                "last_block_runs": round(self.last_rows / self.rows, 4)}


_FULL_PER_ROW: dict[str, float] = {}


def full_flops_per_row(bench) -> float:
    """Block-stack Linear FLOPs of one transformer row (one image, one branch), measured on an unhooked model."""
    if bench.model not in _FULL_PER_ROW:
        pipe = bench.pipe(_scheduler(bench))
        meter = ComputeMeter(pipe.transformer)
        pipe([0], latents=torch.zeros_like(_latents(bench, [0])), num_inference_steps=1, guidance_scale=1.0,
             output_type="pt")
        _FULL_PER_ROW[bench.model] = meter.flops / meter.rows
    return _FULL_PER_ROW[bench.model]


def _diffusers_hooks(transformer) -> tuple[Callable, Callable]:
    """Before / after a pipeline call: reset the stateful diffusers hooks and set (clear) one cache context (a
    pipeline that sets its own per branch, as ``MNISTWanPipeline`` does, replaces it for each of its calls)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.invalidate_child_registries_cache()

    def before():
        registry.reset_stateful_hooks()
        _set_cache_context(transformer, CacheContext("cfg-batch"))

    def after():
        registry.reset_stateful_hooks()
        _set_cache_context(transformer, None)

    return before, after


def _private_class(pipe, before=None, after=None, on_call=None):
    """Give ``pipe`` its own subclass whose ``__call__`` runs ``before`` / ``after`` / ``on_call`` around the call."""
    base = type(pipe)

    def __call__(self, *args, **kwargs):
        if before is not None:
            before()
        try:
            out = base.__call__(self, *args, **kwargs)
        finally:
            if after is not None:
                after()
        if on_call is not None:
            on_call()
        return out

    pipe.__class__ = type(f"{base.__name__}_Peer", (base,), {"__call__": __call__})
    return pipe


def peer_pipe(bench, apply: Callable, kind: str, extra: dict, freeze_after: int | None = None):
    """A fresh pipeline with the peer ``apply(pipe)`` on its transformer, metered, its state reset per call.

    ``extra`` receives ``compute`` / ``last_block_runs`` after each of the first ``freeze_after`` calls.
    """
    freeze_after = freeze_after or math.ceil(bench.samples / bench.batch)

    def hook(pipe):
        meter = ComputeMeter(pipe.transformer, full_flops_per_row(bench))

        def on_call():
            meter.calls += 1
            if meter.calls <= freeze_after:
                extra.update(meter.summary())

        if kind == "diffusers":
            apply(pipe)
            before, after = _diffusers_hooks(pipe.transformer)
            _private_class(pipe, before, after, on_call)
        else:  # cache-dit: resets its contexts itself, on the (private) class it is applied to
            _private_class(pipe, on_call=on_call)
            apply(pipe)

    return bench.pipe(_scheduler(bench), hook=hook)


def probe_compute(bench, n: int, apply: Callable, kind: str) -> float:
    """Compute fraction of the peer on the probe batch (seeds ``PROBE_SEED0`` …, not the benchmark's)."""
    extra: dict = {}
    pipe = peer_pipe(bench, apply, kind, extra, freeze_after=1)
    seeds = list(range(PROBE_SEED0, PROBE_SEED0 + PROBE_SAMPLES))
    pipe([s % 10 for s in seeds], latents=_latents(bench, seeds), num_inference_steps=n,
         guidance_scale=_guidance(bench), output_type="pt")
    return extra["compute"]


def thresholds_for(bench, n: int, apply_of: Callable[[float], Callable], kind: str, lo: float, hi: float,
                   targets=TARGETS, refine: int = 3) -> dict[float, tuple[float, float]]:
    """For each target: the threshold (3 significant digits) whose probe compute is closest to it, and that compute.

    A log-spaced grid from ``lo`` to ``hi`` (compute falls as the threshold rises), then ``refine`` bisection steps
    between the grid points that bracket each target.
    """
    seen: dict[float, float] = {}

    def c(t: float) -> float:
        t = float(f"{t:.3g}")
        if t not in seen:
            seen[t] = probe_compute(bench, n, apply_of(t), kind)
        return seen[t]

    grid = [lo * (hi / lo) ** (i / 9) for i in range(10)]
    values = []
    for t in grid:
        values.append(c(t))
        if values[-1] < min(targets) - 0.05:
            break
    picks = {}
    for target in targets:
        a = b = None
        for t, v in zip(grid, values):
            if v >= target:
                a = t
            elif b is None:
                b = t
        if a is not None and b is not None:
            for _ in range(refine):
                m = math.sqrt(a * b)
                if c(m) >= target:
                    a = m
                else:
                    b = m
        best = min(seen, key=lambda t: (abs(seen[t] - target), t))
        picks[target] = (best, seen[best])
    return picks


def _distinct(picks) -> list:
    """Picks in order of falling compute, each configuration once."""
    out = []
    for p in sorted(picks, key=lambda p: -p[-1]):
        if all(p[:-1] != q[:-1] for q in out):
            out.append(p)
    return out


# -- the peers -------------------------------------------------------------------------------------------------
def fbcache(threshold: float) -> Callable:
    def apply(pipe):
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=threshold))

    return apply


def taylorseer_identifiers(transformer, block_level: bool = BLOCK_LEVEL_TAYLORSEER) -> tuple[list[str], list[str]]:
    """(cache_identifiers, skip_predict_identifiers) for our DiT / Flux / Wan transformers.

    Module level (the TaylorSeer paper's units): DiT ``attn1`` and ``ff`` outputs; Flux dual blocks ``attn`` (both
    streams), ``ff``, ``ff_context``; Flux single blocks: the ``proj_out`` output is forecast and ``attn`` /
    ``proj_mlp`` (which only feed ``proj_out``) return zeros on forecast steps (diffusers' "skip" mode), as the
    paper's Flux code forecasts the single block's ``linear2`` output. Gates, adaLN and residual adds stay live.
    Wan: ``blocks.N.attn1`` (self-attention), ``attn2`` (cross-attention) and ``ffn`` outputs; diffusers' default
    ``^blocks.*attn`` (``re.fullmatch``) matches none of them (the names end in ``attn1`` / ``attn2``).
    Block level: every block's output is forecast, which makes the model output depend only on the last block's
    forecast (= Taylor extrapolation of the final hidden state).
    """
    if block_level:
        return [r"((single_)?transformer_blocks|blocks)\.\d+"], []
    if is_wan(transformer):
        return [r"blocks\.\d+\.(attn1|attn2|ffn)"], []
    if hasattr(transformer, "single_transformer_blocks"):  # Flux
        return ([r"transformer_blocks\.\d+\.(attn|ff|ff_context)", r"single_transformer_blocks\.\d+\.proj_out"],
                [r"single_transformer_blocks\.\d+\.(attn|proj_mlp)"])
    return [r"transformer_blocks\.\d+\.(attn1|attn2|ff)"], []


def taylorseer(interval: int, warmup: int, order: int = 1, block_level: bool = BLOCK_LEVEL_TAYLORSEER) -> Callable:
    def apply(pipe):
        import re

        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        cache_ids, skip_ids = taylorseer_identifiers(pipe.transformer, block_level)
        names = [name for name, _ in pipe.transformer.named_modules()]
        for pattern in cache_ids + skip_ids:
            if not any(re.fullmatch(pattern, name) for name in names):
                raise RuntimeError(f"TaylorSeer identifier {pattern!r} matches no module of "
                                   f"{type(pipe.transformer).__name__}")
        apply_taylorseer_cache(pipe.transformer, TaylorSeerCacheConfig(
            cache_interval=interval, disable_cache_before_step=warmup, max_order=order,
            taylor_factors_dtype=torch.float32, cache_identifiers=cache_ids, skip_predict_identifiers=skip_ids or None))

    return apply


_MAG_RATIOS: dict[tuple[str, int], list[float]] = {}


def mag_ratios(bench, n: int) -> list[float]:
    """MagCache's own calibration (``calibrate=True``) on this model and N, on the probe seeds.

    With CFG as two calls per step in their own cache contexts (``mnist-wan``) the hook calibrates each context and
    prints one list per context; ``MagCacheConfig`` takes one list for both, so the mean of the lists is used.
    """
    key = (bench.model, n)
    if key not in _MAG_RATIOS:
        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        def apply(pipe):
            apply_mag_cache(pipe.transformer, MagCacheConfig(calibrate=True, num_inference_steps=n))

        pipe = peer_pipe(bench, apply, "diffusers", {}, freeze_after=1)
        seeds = list(range(PROBE_SEED0, PROBE_SEED0 + PROBE_SAMPLES))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            pipe([s % 10 for s in seeds], latents=_latents(bench, seeds), num_inference_steps=n,
                 guidance_scale=_guidance(bench), output_type="pt")
        lists = [ast.literal_eval(ln) for ln in out.getvalue().splitlines() if ln.startswith("[") and "]" == ln[-1:]
                 and not ln.startswith("[MagCache]")]
        if not lists:
            raise RuntimeError(f"MagCache calibration printed no ratios: {out.getvalue()!r}")
        if any(len(ratios) != n for ratios in lists):
            raise RuntimeError(f"MagCache calibration gave {[len(r) for r in lists]} ratios for {n} steps")
        _MAG_RATIOS[key] = [float(sum(r) / len(lists)) for r in zip(*lists)]
    return _MAG_RATIOS[key]


def magcache(threshold: float, ratios: list[float], n: int, warmup: int) -> Callable:
    def apply(pipe):
        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        apply_mag_cache(pipe.transformer, MagCacheConfig(
            threshold=threshold, mag_ratios=torch.tensor(ratios), num_inference_steps=n,
            retention_ratio=warmup / n, max_skip_steps=3))

    return apply


def cache_dit_available() -> str | None:
    """None if cache-dit imports, else why not."""
    try:
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # its INFO lines would bury the benchmark's
        import cache_dit  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def cache_dit_adapter(pipe):
    """A BlockAdapter for our pipeline mirroring cache-dit's registered DiT / Flux / Wan adapters."""
    from cache_dit import BlockAdapter, ForwardPattern
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel

    t = pipe.transformer
    if isinstance(t, DiTTransformer2DModel):
        from cache_dit.caching.patch_functors import DiTPatchFunctor

        return BlockAdapter(pipe=pipe, transformer=t, blocks=t.transformer_blocks,
                            forward_pattern=ForwardPattern.Pattern_3, patch_functor=DiTPatchFunctor(),
                            check_forward_pattern=True, has_separate_cfg=False)
    if isinstance(t, FluxTransformer2DModel):
        from cache_dit.caching.patch_functors import FluxPatchFunctor

        return BlockAdapter(pipe=pipe, transformer=t, blocks=t.transformer_blocks + t.single_transformer_blocks,
                            blocks_name="transformer_blocks", dummy_blocks_names=["single_transformer_blocks"],
                            forward_pattern=ForwardPattern.Pattern_1, patch_functor=FluxPatchFunctor(),
                            has_separate_cfg=False)
    if is_wan(t):  # cache-dit's "Wan" adapter (Wan 2.1): Pattern_2, no patch functor, CFG as separate calls
        return BlockAdapter(pipe=pipe, transformer=t, blocks=t.blocks, forward_pattern=ForwardPattern.Pattern_2,
                            check_forward_pattern=True, has_separate_cfg=True)
    raise TypeError(f"no cache-dit adapter for {type(t).__name__}")


CALIBRATORS = {None: "", "taylorseer": "+TaylorSeer", "dmd": "+DMD", "foca": "+FoCa"}


def calibrator_config(calibrator: str | None):
    """cache-dit's calibrator config for ``calibrator`` as shipped (its defaults), or None for plain DBCache."""
    if calibrator is None:
        return None
    import cache_dit

    if calibrator == "taylorseer":
        return cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1)
    if calibrator == "dmd":
        return cache_dit.DMDCalibratorConfig()  # history 6, automatic rank, ridge 1e-8, gesdd SVD
    if calibrator == "foca":
        return cache_dit.FoCaCalibratorConfig()  # no knobs
    raise ValueError(f"unknown cache-dit calibrator {calibrator!r}; one of {sorted(c for c in CALIBRATORS if c)}")


def dbcache(threshold: float, n: int, warmup: int, calibrator: str | None = None, max_continuous: int = 3) -> Callable:
    def apply(pipe):
        import cache_dit
        from cache_dit import DBCacheConfig

        config = DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=warmup,
                               max_continuous_cached_steps=max_continuous, residual_diff_threshold=threshold,
                               enable_separate_cfg=is_wan(pipe.transformer), num_inference_steps=n)
        cache_dit.enable_cache(cache_dit_adapter(pipe), cache_config=config,
                               calibrator_config=calibrator_config(calibrator))

    return apply


# -- rows ------------------------------------------------------------------------------------------------------
PRESETS = ("quality", "balanced", "fast")


def preset_targets(bench, n: int) -> tuple[float, ...]:
    """The compute of the TC-Padé preset rows at ``n`` steps (measured, from the results), else their budgets."""
    from tcpade_fx import Policy

    out = []
    for preset in PRESETS:  # the benchmark's own row (not an --fd-only one), so both runs pick the same thresholds
        rows = [r for (steps, label, _, shift), r in bench.done.items()
                if steps == n and label == f"TC-Padé {preset}" and shift == bench.shift and not r.get("fd_only")]
        out.append(round(rows[0]["compute"], 3) if rows else Policy.preset(preset).compute_budget)
    return tuple(out)


def _row(bench, label: str, apply: Callable, kind: str, **knobs):
    extra = {"peer_knobs": knobs}
    return label, FAMILY, lambda: peer_pipe(bench, apply, kind, extra), extra


def peer_rows(bench, n: int, match: str | None = None) -> Iterator[tuple[str, str, Callable, dict]]:
    """The peer rows at ``n`` steps. ``match`` (a regex) skips every peer whose name (its label up to the knob,
    e.g. ``cache-dit DBCache+DMD F1B0``) it does not match, before that peer's threshold search."""
    warm = warmup_steps(n)

    def wanted(name: str) -> bool:
        return match is None or re.search(match, name) is not None

    for t, c in (_distinct(thresholds_for(bench, n, fbcache, "diffusers", 0.005, 1.0).values())
                 if wanted("diffusers FBCache") else ()):
        yield _row(bench, f"diffusers FBCache t={t:g}", fbcache(t), "diffusers", threshold=t, probe_compute=round(c, 3))

    for k in TAYLORSEER_INTERVALS if wanted("diffusers TaylorSeer") else ():
        yield _row(bench, f"diffusers TaylorSeer k={k}", taylorseer(k, warm), "diffusers", cache_interval=k,
                   disable_cache_before_step=warm, max_order=1, block_level=BLOCK_LEVEL_TAYLORSEER)

    ratios = mag_ratios(bench, n) if wanted("diffusers MagCache") else None
    picks = thresholds_for(bench, n, lambda t: magcache(t, ratios, n, warm), "diffusers", 0.002, 2.0) if ratios else {}
    for t, c in _distinct(picks.values()):
        yield _row(bench, f"diffusers MagCache t={t:g}", magcache(t, ratios, n, warm), "diffusers", threshold=t,
                   retention_ratio=warm / n, max_skip_steps=3, probe_compute=round(c, 3),
                   mag_ratios=[round(r, 4) for r in ratios])

    why = cache_dit_available()
    if why is not None:
        print(f"peers: cache-dit rows skipped ({why}); pip install cache-dit", file=sys.stderr)
        return
    for calibrator, suffix in CALIBRATORS.items():
        name = f"cache-dit DBCache{suffix} F1B0"
        if not wanted(name):
            continue
        # the calibrators added for the frontier comparison land at the presets' compute, the first two span TARGETS
        targets = preset_targets(bench, n) if calibrator in ("dmd", "foca") else TARGETS
        # at most 3 cached steps in a row (SGLang's cache-dit default, MagCache's K); where that cannot reach a
        # target (its floor is about 45 % compute here), cache-dit's own default: no limit
        by_mc = {mc: thresholds_for(bench, n, lambda t, mc=mc: dbcache(t, n, warm, calibrator, mc), "cache-dit",
                                    0.005, 2.0, targets)
                 for mc in DBCACHE_MAX_CONTINUOUS}
        picks = []
        for target in targets:
            options = [(mc, *by_mc[mc][target]) for mc in DBCACHE_MAX_CONTINUOUS]
            close = [o for o in options if abs(o[2] - target) <= 0.05]
            picks.append(close[0] if close else min(options, key=lambda o: abs(o[2] - target)))
        for mc, t, c in _distinct(picks):
            mc_label = f"MC{mc}" if mc >= 0 else "MC-"
            yield _row(bench, f"{name} {mc_label} t={t:g}", dbcache(t, n, warm, calibrator, mc), "cache-dit",
                       threshold=t, Fn=1, Bn=0, max_warmup_steps=warm, max_continuous_cached_steps=mc,
                       calibrator=calibrator, taylorseer_order=1 if calibrator == "taylorseer" else None,
                       probe_compute=round(c, 3))
