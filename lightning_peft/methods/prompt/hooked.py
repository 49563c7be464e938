"""What the input-level hosts (prompts, prefixes) share: their modules per adapter set, their hook handles, and
detaching from the model once the last module is gone."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from lightning_peft.core.state import AdapterState
from lightning_peft.errors import PeftConfigError


def applied_target(model: nn.Module, applied: Any) -> nn.Module | None:
    """The module an input-level strategy attached its host to (``applied.extra["target"]``, ``""``: ``model``), or
    ``None`` when it is gone from ``model``."""
    name = applied.extra.get("target", "")
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None


class HookedSets(nn.Module):
    """What both input-level hosts keep the same way: their modules per adapter set (``sets[set_name][strategy]``),
    their hook handles, and detaching from the model (hooks removed, the attribute ``attr`` deleted) once the last
    module is gone, so the model is as before."""

    attr: ClassVar[str] = ""
    #: what the host feeds the model, for errors ("prompts", "prefixes")
    feeds: ClassVar[str] = ""

    def __init__(self, state: AdapterState) -> None:
        super().__init__()
        self.sets = nn.ModuleDict()
        self._state = state
        self._handles: list[Any] = []

    def check_state(self, target: nn.Module, state: AdapterState) -> None:
        if self._state is not state:
            raise PeftConfigError(
                f"{type(target).__name__} already takes {self.feeds} from stacks applied to another model object (e.g. "
                "the LightningModule vs the model it wraps); apply every stack to the same model"
            )

    def add(self, set_name: str, key: str, module: nn.Module) -> None:
        if set_name not in self.sets:
            self.sets[set_name] = nn.ModuleDict()
        self.sets[set_name][key] = module

    def discard(self, target: nn.Module, set_name: str, key: str) -> None:
        """Drop one module; with the last one gone, remove the hooks and detach from ``target``."""
        if set_name in self.sets and key in self.sets[set_name]:
            del self.sets[set_name][key]
            if len(self.sets[set_name]) == 0:
                del self.sets[set_name]
        if len(self.sets) == 0:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            if target._modules.get(self.attr) is self:
                del target._modules[self.attr]


__all__ = ["HookedSets", "applied_target"]
