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
    parameters: tuple  # (name, id, dtype) per parameter and buffer (not the device: offloading moves weights)
    submodules: tuple  # id per submodule, in order
    adapters: tuple  # per PEFT tuner layer: (name, active adapters, merged adapters, disabled, scales)

    def difference(self, other: "ModelFingerprint") -> str:
        """What changed from ``other`` to this one, in words (empty when nothing did)."""
        changes = []
        if self.adapters != other.adapters:
            changes.append("the PEFT adapters (attached, removed, activated, scaled, merged or disabled)")
        if self.submodules != other.submodules:
            changes.append("submodules (added, removed or replaced)")
        if self.parameters != other.parameters:
            before = {p[0]: p[1:] for p in other.parameters}
            names = [p[0] for p in self.parameters if before.get(p[0]) != p[1:]]
            names += [n for n in before if n not in {p[0] for p in self.parameters}]
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            changes.append(f"parameters replaced by new tensors ({shown})")
        return "; ".join(changes)


def _adapter_state(name: str, layer) -> tuple:
    active = getattr(layer, "active_adapters", ())
    scaling = getattr(layer, "scaling", {}) or {}
    return (
        name,
        tuple(active) if isinstance(active, (list, tuple)) else (active,),
        tuple(getattr(layer, "merged_adapters", ()) or ()),
        bool(getattr(layer, "disable_adapters", False)),
        tuple(sorted((k, float(v)) for k, v in scaling.items())),
    )


def _is_tuner_layer(module: torch.nn.Module) -> bool:
    return hasattr(module, "merged_adapters") and hasattr(module, "active_adapters")


def model_fingerprint(module: torch.nn.Module) -> ModelFingerprint:
    """The fingerprint of ``module`` as it is now (one walk over its submodules and tensors)."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    submodules = list(module.named_modules())
    return ModelFingerprint(
        parameters=tuple((n, id(t), t.dtype) for n, t in tensors),
        submodules=tuple(id(m) for _, m in submodules),
        adapters=tuple(_adapter_state(n, m) for n, m in submodules if _is_tuner_layer(m)),
    )
