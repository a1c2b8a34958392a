"""`CheckpointError` and the value check every tensor read from a checkpoint goes through."""

from __future__ import annotations

import json


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, damaged or inconsistent; the message names it and the fix."""


NON_FINITE_HINT = "fix the checkpoint, or pass --allow-non-finite (allow_non_finite=True) to accept it"


def check_values(name: str, tensor, where: str, allow_non_finite: bool = False) -> None:
    """Refuse a NaN/inf weight, naming the tensor and its first bad index: a model loaded from it
    would only show non-finite logits later, far from the cause."""
    import torch

    if allow_non_finite or not tensor.is_floating_point() or tensor.numel() == 0:
        return
    finite = torch.isfinite(tensor if tensor.element_size() > 1 else tensor.float())  # no float8 isfinite
    if bool(finite.all()):
        return
    flat = int((~finite).reshape(-1).nonzero()[0, 0])
    index, rest = [], flat
    for n in reversed(tensor.shape):
        index.append(rest % n)
        rest //= n
    value = tensor.reshape(-1)[flat].item()
    raise CheckpointError(f"tensor {name!r} in {where} holds {value} at index {list(reversed(index))} "
                          f"({int((~finite).sum())} non-finite values); {NON_FINITE_HINT}")


def read_json_object(path: str, what: str, error=CheckpointError) -> dict:
    """The JSON object in `path`, or one `error` line naming the file and `what` to do."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise error(f"{path} does not exist; {what}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); {what}") from None
    if not isinstance(obj, dict):
        raise error(f"{path} holds a JSON {type(obj).__name__}, not an object; {what}")
    return obj
