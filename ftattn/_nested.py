"""A linear layer's call on a nested tensor (torch.nested, either layout): its rows.

torch.nn.TransformerEncoder turns a padded batch into a nested tensor in eval mode
(``enable_nested_tensor=True``, the default, with a src_key_padding_mask) and its layers call
linear1 / linear2 on it: ftattn's layers stopped there with torch's internal "NestedTensorImpl
doesn't support sizes" (found this session). A linear layer acts on each row alone, so the
layer runs once on the rows of every component, stacked, and gives them back in the input's
layout: one product, one check, one report.
"""
from typing import Callable

import torch


def on_rows(x: torch.Tensor, fn: Callable, what: str):
    """``fn`` (a call on a tensor [..., in] -> [..., out] or (that, report)) over the rows of
    the nested tensor ``x``, back as a nested tensor of x's layout."""
    if x.layout == torch.jagged:
        if x._ragged_idx == x.dim() - 1:
            raise ValueError(f"{what}: a nested tensor ragged in its last dimension (the features) has no one "
                             f"number of input features; make the features the last, regular dimension")
        out = fn(x.values())
        y, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        y = torch.nested.nested_tensor_from_jagged(y, offsets=x.offsets(), lengths=x.lengths(),
                                                   jagged_dim=x._ragged_idx)
        return (y, *rest) if rest else y
    parts = x.unbind()
    features = {p.shape[-1] if p.dim() else None for p in parts}
    if len(features) > 1 or None in features:
        raise ValueError(f"{what}: the components of a nested tensor need one number of input features in their "
                         f"last dimension, got {sorted(f for f in features if f is not None)}"
                         f"{' and a 0-d component' if None in features else ''}")
    if not parts:
        raise ValueError(f"{what}: the nested tensor has no components; there is nothing to run")
    k = features.pop()
    rows = [p.numel() // k if k else p.shape[:-1].numel() for p in parts]
    out = fn(torch.cat([p.reshape(n, k) for p, n in zip(parts, rows)]))
    y, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
    ys = [part.reshape(*p.shape[:-1], y.shape[-1]) for p, part in zip(parts, y.split(rows))]
    y = torch.nested.as_nested_tensor(ys, layout=torch.strided)
    return (y, *rest) if rest else y
