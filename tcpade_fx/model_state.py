"""What the captured graphs were built from, cheap to compare: parameter and submodule identity, and the PEFT
adapter state that a LoRA changes without touching a base weight.

The graphs share the module's parameter tensors, so in-place weight updates (``param.data.copy_``, ``fuse_lora``'s
merge into the base weight) reach them. What does not: a Parameter or submodule replaced by a new object
(``load_state_dict(assign=True)``, a swapped layer, a LoRA attached after the capture), and adapter state baked
into the graph as constants or control flow (the active adapters, their scales, merged or disabled adapters).
:func:`model_fingerprint` covers both; the runtime compares it at the start of each trajectory and re-captures
when it changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of every submodule, parameter and buffer, and every PEFT tuner layer's state, as flat tuples: cheap
    to take (one walk over the module tree) and to compare. :meth:`difference` names what changed."""

    tensors: tuple  # id per parameter and buffer, module by module (not their devices: offloading moves weights)
    submodules: tuple  # id per submodule, in walk order
    adapters: tuple  # per PEFT tuner layer: (active adapters, merged adapters, disabled, scales)

    def difference(self, other: "ModelFingerprint") -> str:
        """What changed from ``other`` to this one, in words (empty when nothing did)."""
        changes = []
        if self.adapters != other.adapters:
            changes.append("the PEFT adapters (attached, removed, activated, scaled, merged or disabled)")
        if self.submodules != other.submodules:
            changes.append("submodules (added, removed or replaced)")
        if self.tensors != other.tensors:
            changes.append("parameters or buffers replaced by new tensors")
        return "; ".join(changes)


def _adapter_state(layer) -> tuple:
    active = getattr(layer, "active_adapters", ())
    scaling = getattr(layer, "scaling", {}) or {}
    return (
        tuple(active) if isinstance(active, (list, tuple)) else (active,),
        tuple(getattr(layer, "merged_adapters", ()) or ()),
        bool(getattr(layer, "disable_adapters", False)),
        tuple(sorted((k, float(v)) for k, v in scaling.items())),
    )


def model_fingerprint(module: torch.nn.Module) -> ModelFingerprint:
    """The fingerprint of ``module`` as it is now: one walk over the ``_modules`` tree (no names are built)."""
    tensors, submodules, adapters = [], [], []
    stack = [module]
    while stack:
        m = stack.pop()
        d = m.__dict__
        submodules.append(id(m))
        tensors.extend(map(id, d["_parameters"].values()))
        tensors.extend(map(id, d["_buffers"].values()))
        if "merged_adapters" in d:  # a PEFT tuner layer (BaseTunerLayer keeps this list on the instance)
            adapters.append(_adapter_state(m))
        stack.extend(d["_modules"].values())
    return ModelFingerprint(tuple(tensors), tuple(submodules), tuple(adapters))
