"""Row routing for mixed-adapter batches: which adapter set each row of one batch computes with.

A :class:`RowRoute` lives on the model's :class:`~lightning_peft.core.state.AdapterState` (``state.route``) for
the duration of one forward (:mod:`lightning_peft.stack.mixed` sets and clears it, after validating it). While
it is there, every adapted component reads it instead of ``state.active``:

- an :class:`~lightning_peft.core.layer.AdaptedLayer` runs its base layer once on the whole batch, scales the
  input / output rows of sets with scaling deltas (IA3), and adds each set's additive deltas (LoRA, AdaLoRA,
  DoRA) to that set's rows only (:meth:`RowRoute.layer_forward`, ``peft``'s ``_mixed_batch_forward``);
- a bottleneck adapter changes its own set's rows of the module output (:meth:`RowRoute.module_output`);
- the prompt host prepends each row its own set's virtual tokens (:meth:`RowRoute.per_row`).

Rows named :data:`BASE` (``"__base__"``, as in ``peft``) get the base layer alone. Rows are the leading
dimension of every adapted layer's input, as in the models' own batch-first layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.errors import AdapterStateError, PeftConfigError

#: the name of rows that use the base model alone (``peft``'s spelling)
BASE = "__base__"


class RowRoute:
    """Per-row adapter set names for one batch, grouped: ``groups[set] = row indices`` (base rows included)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.batch = len(self.names)
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            groups.setdefault(name, []).append(i)
        self.groups = groups
        #: the adapter sets the rows use, in order of first appearance (``"__base__"`` excluded)
        self.sets = [s for s in groups if s != BASE]
        self._rows: dict[tuple[str, torch.device], Tensor | slice] = {}
        self._order: dict[tuple[torch.device, tuple[str, ...]], Tensor] = {}

    def rows(self, name: str, device: torch.device) -> Tensor | slice:
        """The rows of set ``name``: a slice when they are contiguous (a view, no copy), else an index tensor."""
        key = (name, device)
        rows = self._rows.get(key)
        if rows is None:
            idx = self.groups[name]
            if idx[-1] - idx[0] + 1 == len(idx):
                rows = slice(idx[0], idx[-1] + 1)
            else:
                rows = torch.tensor(idx, dtype=torch.long, device=device)
            self._rows[key] = rows
        return rows

    def check_batch(self, x: Tensor, where: str) -> None:
        """The backstop of the model-level check: an adapted layer called on rows that are not the batch's (a
        model that flattens its batch, a submodule called alone with another batch) raises instead of mixing."""
        if x.dim() == 0 or x.shape[0] != self.batch:
            raise PeftConfigError(
                f"adapter_names has {self.batch} entries but {where} got an input of shape {tuple(x.shape)}; a "
                "mixed-adapter batch needs one name per row, and layers whose input leads with the batch dimension"
            )

    # -- adapted layers ------------------------------------------------------------------------------------
    def layer_forward(self, layer: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``layer``'s composition rule applied per row: each set's deltas on its own rows, the base on all."""
        groups = [(s, list(layer.adapters[s].values())) for s in self.sets if s in layer.adapters]
        if not groups:
            return layer.base_layer(x, *args, **kwargs)
        self.check_batch(x, f"a {type(layer.base_layer).__name__} layer")
        s_in = s_out = None  # per-row scales, (batch, features), ones on rows without a scaling delta
        for name, deltas in groups:
            for d in deltas:
                if d.kind != "scale":
                    continue
                rows = self.rows(name, x.device)
                si, so = d.input_scale(), d.output_scale()
                if si is not None:
                    s_in = x.new_ones(self.batch, si.numel()) if s_in is None else s_in
                    s_in[rows] = s_in[rows] * si.to(x.dtype)
                if so is not None:
                    s_out = so.new_ones(self.batch, so.numel()) if s_out is None else s_out
                    s_out[rows] = s_out[rows] * so
        x_base = x if s_in is None else x * s_in.view(self.batch, *(1,) * (x.dim() - 2), -1)
        y = layer.base_layer(x_base, *args, **kwargs)
        if s_out is not None:
            y = y * s_out.to(y.dtype).view(self.batch, *(1,) * (y.dim() - 2), -1)
        out = y  # rows of different sets are disjoint: each set writes its own rows
        for name, deltas in groups:
            additive = [d for d in deltas if d.kind != "scale"]
            if not additive:
                continue
            rows = self.rows(name, x.device)
            xr, yr = x[rows], y[rows]
            base_out = yr
            for d in additive:
                yr = d.add_to_base(yr, xr, layer.base_layer, base_out) if d.needs_base else d.add_to(yr, xr)
            if yr.dtype != out.dtype:  # under autocast a delta may return another dtype: keep the wider one
                dtype = torch.promote_types(yr.dtype, out.dtype)
                out, yr = out.to(dtype), yr.to(dtype)
            if out is y and torch.is_grad_enabled():  # autograd may hold views of y: write into a copy
                out = y.clone()
            out[rows] = yr
        return out

    # -- module outputs and prompts ------------------------------------------------------------------------
    def module_output(self, name: str, output: Any, adapt: Callable[..., Tensor], source: Tensor | None = None) -> Any:
        """``output`` (a tensor, or a tuple led by one) with ``adapt`` applied to the rows of set ``name``:
        ``adapt(output[rows])``, or with a ``source`` (a parallel adapter's input) ``adapt(output[rows],
        source[rows])``."""
        if name not in self.groups:
            return None
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (self.module_output(name, output[0], adapt, source), *output[1:])
        if not isinstance(output, Tensor):
            return None
        self.check_batch(output, "a bottleneck adapter")
        rows = self.rows(name, output.device)
        out = output.clone()  # the module's output may be another tensor's view (its input, a cache): no in-place
        if source is None:
            out[rows] = adapt(output[rows])
        else:
            self.check_batch(source, "a parallel bottleneck adapter's input")
            out[rows] = adapt(output[rows], source[rows]).to(out.dtype)
        return out

    def per_row(self, values: dict[str, Tensor]) -> Tensor:
        """A (batch, ...) tensor whose row ``i`` is ``values[names[i]]``; every row's set must be in ``values``."""
        missing = [n for n in self.groups if n not in values]
        if missing:
            raise AdapterStateError(f"rows of {missing} have no value here; every row needs one")
        keys = tuple(values)
        device = values[keys[0]].device
        order = self._order.get((device, keys))
        if order is None:
            order = torch.tensor([keys.index(n) for n in self.names], dtype=torch.long, device=device)
            self._order[(device, keys)] = order
        return torch.stack([values[k] for k in keys])[order]


__all__ = ["BASE", "RowRoute"]
