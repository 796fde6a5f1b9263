"""Tiny, offline, random-weight diffusers transformers with matching example inputs.

For mechanics only (capture, split, rewrite, runtime): random weights say nothing about image quality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

TinyCase = tuple[torch.nn.Module, dict]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_flux_transformer() -> torch.nn.Module:
    """The tiny FluxTransformer2DModel (2 dual + 2 single blocks, 8 channels) of the tests and tiny pipelines."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, out_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_wan_transformer() -> torch.nn.Module:
    """The tiny WanTransformer3DModel (2 blocks, 4 latent channels)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def tiny_sd3_transformer() -> torch.nn.Module:
    """The tiny SD3Transformer2DModel (2 joint blocks, 8×8 latents)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16,
    ).eval()


def tiny_pixart_transformer() -> torch.nn.Module:
    """The tiny PixArtTransformer2DModel (2 blocks, 8×8 latents, 24-d captions)."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=24, norm_num_groups=1,
        use_additional_conditions=False,
    ).eval()


def tiny_dit(batch: int = 2, seed: int = 0) -> TinyCase:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
        num_embeds_ada_norm=10, norm_num_groups=1,
    ).eval()
    g = _gen(seed)
    kw = dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        timestep=torch.full((batch,), 500.0),
        class_labels=torch.arange(batch) % 10,
        return_dict=False,
    )
    return m, kw


def tiny_flux(batch: int = 2, seed: int = 0, image_tokens: int = 16, text_tokens: int = 8) -> TinyCase:
    torch.manual_seed(seed)
    m = tiny_flux_transformer()
    g = _gen(seed)
    side = int(image_tokens**0.5)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    kw = dict(
        hidden_states=torch.randn(batch, image_tokens, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, text_tokens, 32, generator=g),
        pooled_projections=torch.randn(batch, 16, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids,
        txt_ids=torch.zeros(text_tokens, 3),
        return_dict=False,
    )
    return m, kw


def tiny_wan(batch: int = 1, seed: int = 0) -> TinyCase:
    torch.manual_seed(seed)
    m = tiny_wan_transformer()
    g = _gen(seed)
    kw = dict(
        hidden_states=torch.randn(batch, 4, 2, 8, 8, generator=g),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, 8, 16, generator=g),
        return_dict=False,
    )
    return m, kw


def tiny_sd3(batch: int = 2, seed: int = 0) -> TinyCase:
    torch.manual_seed(seed)
    m = tiny_sd3_transformer()
    g = _gen(seed)
    kw = dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, 6, 16, generator=g),
        pooled_projections=torch.randn(batch, 16, generator=g),
        timestep=torch.full((batch,), 500.0),
        return_dict=False,
    )
    return m, kw


def tiny_pixart(batch: int = 2, seed: int = 0) -> TinyCase:
    torch.manual_seed(seed)
    m = tiny_pixart_transformer()
    g = _gen(seed)
    kw = dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, 6, 24, generator=g),
        timestep=torch.full((batch,), 500.0),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )
    return m, kw


TINY_TRANSFORMERS: dict[str, Callable[..., TinyCase]] = {
    "dit": tiny_dit,
    "flux": tiny_flux,
    "wan": tiny_wan,
    "sd3": tiny_sd3,
    "pixart": tiny_pixart,
}


class AttentionCounter:
    """Counts attention ops (``aten.*scaled_dot_product*``) run on real tensors while active; those on the fake
    tensors of a torch.export trace are not counted. A measure of model work that timing noise does not blur::

        with AttentionCounter() as count:
            module(**kwargs)
        count.calls
    """

    def __init__(self):
        self.calls = 0
        self._mode = None

    def __enter__(self) -> "AttentionCounter":
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if "scaled_dot_product" in func.__name__:
                    flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
                    if flat and not any(isinstance(a, FakeTensor) for a in flat):
                        counter.calls += 1
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self._mode.__exit__(*exc)
        return False


def drive_controller(policy, steps: int, error: float):
    """A :class:`~tcpade_fx.controller.StepController` run over ``steps`` evenly spaced times, every checked error
    ``error`` (the first computed step has none): what its decisions are with no model behind it."""
    from .controller import StepController

    ctl = StepController(policy, steps)
    for i in range(steps):
        t = 1.0 - i / steps
        if ctl.decide(i, t).compute:
            ctl.record_compute(i, t, error if ctl.computed else None, None)
        else:
            ctl.record_predict()
    return ctl


#: ops whose result is a Python value read off a tensor: on CUDA each one waits for the device (a host sync).
#: Under autograd .item() / bool() reach the mode as aten._local_scalar_dense; under torch.inference_mode (no
#: autograd key to decompose them) as aten.item / aten.is_nonzero: each read is seen once either way
_READ_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal")


@dataclass
class HostTransfer:
    """One read of a tensor's value into Python or one copy between host and device, seen while counting."""

    kind: str  # "read" (item(), float(), bool(), tolist(), torch.equal), "to_host", "to_device" or "staged" (copies)
    op: str  # the aten op or Tensor method
    device: str  # the tensor's device type ("cpu", "cuda", ...); for "to_device" the destination's
    call: int | None  # index into HostSyncCounter.calls, None outside a call of the watched modules
    where: str = ""  # "file.py:line function" of the innermost caller outside torch (tcpade_fx's own first)


@dataclass
class CallSyncs:
    """What one call of a watched module did: its kind and the transfers made inside it."""

    module: str
    kind: str  # "plain" (no tcpade runtime), "first" (captured its graphs), "computed" or "predicted"
    reads: int = 0
    to_host: int = 0
    to_device: int = 0

    @property
    def syncs(self) -> int:
        """Reads plus device-to-host copies: what blocks the host until the device is done."""
        return self.reads + self.to_host


class HostSyncCounter:
    """Counts host syncs while active: every read of a tensor's value into Python (``aten._local_scalar_dense``,
    which ``.item()``, ``float()``, ``int()``, ``bool()`` and ``if tensor:`` all reach, or ``aten.item`` /
    ``aten.is_nonzero`` under ``torch.inference_mode``; ``aten.equal``;
    ``Tensor.tolist()``), every device-to-host copy, and (apart) every blocking host-to-device copy and tensor built
    from Python numbers for a device (``torch.tensor``/``torch.as_tensor`` of floats with ``device=``: a blocking
    copy when it is bound for CUDA). Not counted: a tensor built from Python numbers on the host (no ``device``),
    and a ``non_blocking`` copy (:attr:`staged`: from pinned memory it does not block the host).
    Ops on the fake tensors of a torch.export trace are not counted.

    On a CPU-only run every read counts, as it would on the device it stands in for (``device`` says which
    tensors were read). With ``modules`` (name -> module, e.g. the pipeline's transformer) each call of those
    modules is recorded with its kind, read off the module's tcpade-fx runtime where it has one::

        with count_host_syncs({"transformer": pipe.transformer}) as counter:
            pipe(...)
        counter.per_kind()      # {"first": [5], "computed": [5, 5, 5], "predicted": [2, 2, ...]}
        counter.outside         # transfers between the calls (pipeline, scheduler, tcpade-fx's step hooks)

    Runs eagerly only: under an active dispatch mode torch.compile'd code may run differently; count with the
    eager backend (the runtime's Python around the graphs is the same for every backend).
    """

    def __init__(self, modules: dict[str, torch.nn.Module] | None = None):
        self.modules = dict(modules or {})
        self.events: list[HostTransfer] = []
        self.calls: list[CallSyncs] = []
        self._current: int | None = None
        self._depth = 0
        self._before: tuple | None = None
        self._handles: list = []
        self._modes: list = []

    # -- results ---------------------------------------------------------------------------------------------
    @property
    def syncs(self) -> int:
        """Reads and device-to-host copies, inside and outside the watched calls."""
        return sum(e.kind in ("read", "to_host") for e in self.events)

    @property
    def to_device(self) -> int:
        """Blocking host-to-device copies and tensors built from Python numbers for a device."""
        return sum(e.kind == "to_device" for e in self.events)

    @property
    def staged(self) -> int:
        """Non-blocking host-to-device copies (none on a CPU-only run, where nothing is copied)."""
        return sum(e.kind == "staged" for e in self.events)

    @property
    def outside(self) -> int:
        """Syncs outside the watched modules' calls."""
        return sum(e.kind in ("read", "to_host") and e.call is None for e in self.events)

    def per_kind(self) -> dict[str, list[int]]:
        """Syncs of each watched call, grouped by the call's kind, in call order."""
        out: dict[str, list[int]] = {}
        for c in self.calls:
            out.setdefault(c.kind, []).append(c.syncs)
        return out

    def ops(self, call: int | None | str = "all", *, where: bool = False) -> dict[str, int]:
        """How many of each transferring op or method were seen (``call``: one call's index, None for outside the
        calls, "all" for everything); with ``where``, keyed by the source line that made them too."""
        out: dict[str, int] = {}
        for e in self.events:
            if call == "all" or e.call == call:
                key = f"{e.kind}:{e.op}" + (f" @ {e.where}" if where else "")
                out[key] = out.get(key, 0) + 1
        return out

    # -- counting --------------------------------------------------------------------------------------------
    @staticmethod
    def _where() -> str:
        import sys

        frame, fallback = sys._getframe(2), ""
        while frame is not None:
            path = frame.f_code.co_filename.replace("\\", "/")
            inside_torch = "/torch/" in path or path.endswith("/tcpade_fx/testing.py")
            if not inside_torch:
                text = f"{path.rsplit('/', 1)[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
                if "/tcpade_fx/" in path:
                    return text
                fallback = fallback or text
            frame = frame.f_back
        return fallback

    def _add(self, kind: str, op: str, device: str) -> None:
        self.events.append(HostTransfer(kind, op, device, self._current, self._where()))
        if self._current is not None:
            c = self.calls[self._current]
            if kind == "read":
                c.reads += 1
            elif kind == "to_host":
                c.to_host += 1
            elif kind == "to_device":
                c.to_device += 1

    def _pre_hook(self, name: str):
        def hook(mod, args, kwargs):
            self._depth += 1
            if self._depth > 1:  # a watched module called inside a watched call (a capture tracing it): same call
                return None
            runtime = getattr(mod, "tcpade", None)  # current_stats: reading .stats would read what is pending
            stats = runtime.current_stats if hasattr(runtime, "current_stats") else getattr(runtime, "stats", None)
            self._before = (stats, len(stats.records), stats.captures) if stats is not None else None
            self.calls.append(CallSyncs(name, "plain"))
            self._current = len(self.calls) - 1
            return None

        return hook

    def _post_hook(self, mod, args, kwargs, output):
        self._depth -= 1
        if self._depth > 0:
            return None
        if self._before is not None:
            stats, records, captures = self._before
            new = stats.records[records:]
            if stats.captures > captures:
                kind = "first"
            else:
                kind = ("computed" if new[-1].computed else "predicted") if new else "plain"
            self.calls[self._current].kind = kind
        self._current = None
        return None

    def __enter__(self) -> "HostSyncCounter":
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        def real(x) -> bool:
            return isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor) and x.device.type != "meta"

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func._schema.name
                if name in _READ_OPS and args and real(args[0]):
                    counter._add("read", name, args[0].device.type)
                elif name == "aten::_to_copy" and args and real(args[0]) and "device" in kwargs:
                    src, dst = args[0].device.type, torch.device(kwargs["device"]).type
                    if src != "cpu" and dst == "cpu":
                        counter._add("to_host", name, src)
                    elif src == "cpu" and dst != "cpu":
                        counter._add("staged" if kwargs.get("non_blocking") else "to_device", name, dst)
                elif name == "aten::copy_" and len(args) > 1 and real(args[0]) and real(args[1]):
                    dst, src = args[0].device.type, args[1].device.type
                    if src != "cpu" and dst == "cpu":
                        counter._add("to_host", name, src)
                    elif src == "cpu" and dst != "cpu":
                        counter._add("staged" if (len(args) > 2 and args[2]) or kwargs.get("non_blocking") else "to_device",
                                     name, dst)
                return func(*args, **kwargs)

        class _Function(TorchFunctionMode):
            # what never reaches the dispatcher on a CPU tensor: tolist() and tensors built from Python data
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.Tensor.tolist and args and real(args[0]):
                    counter._add("read", "Tensor.tolist", args[0].device.type)
                elif (func in (torch.tensor, torch.as_tensor) and args and not isinstance(args[0], torch.Tensor)
                      and kwargs.get("device") is not None):
                    counter._add("to_device", f"torch.{func.__name__}(python data)",
                                 torch.device(kwargs["device"]).type)
                return func(*args, **kwargs)

        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post_hook, with_kwargs=True))
        self._modes = [_Function(), _Dispatch()]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles, self._modes = [], []
        return False


def count_host_syncs(modules: dict[str, torch.nn.Module] | torch.nn.Module | None = None) -> HostSyncCounter:
    """A :class:`HostSyncCounter` (use it as a context manager); ``modules``: a module (named "transformer") or
    name -> module whose calls are recorded one by one."""
    if isinstance(modules, torch.nn.Module):
        modules = {"transformer": modules}
    return HostSyncCounter(modules)
