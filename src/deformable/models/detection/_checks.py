"""Argument checks shared by the detection builders."""

from __future__ import annotations

import inspect

from torchvision.models.detection.transform import GeneralizedRCNNTransform


def constructor_kwargs(cls) -> set[str]:
    """Keyword arguments ``cls.__init__`` really takes: its named parameters, plus, when it has
    ``**kwargs``, the ones torchvision's detectors forward to ``GeneralizedRCNNTransform``
    (which would silently ignore a misspelt one)."""
    params = inspect.signature(cls.__init__).parameters
    names = {n for n, p in params.items()
             if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}  # fmt: skip
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        transform = inspect.signature(GeneralizedRCNNTransform.__init__).parameters
        names |= {n for n, p in transform.items() if n != "self" and not n.startswith("_")
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}  # fmt: skip
    return names


def check_kwargs(where: str, cls, kwargs: dict, reserved: dict[str, str]) -> None:
    """TypeError for a keyword ``cls`` does not take, or one the builder sets itself.

    Args:
        where (str): the builder's name, for the message.
        cls (type): the torchvision class the keywords go to.
        kwargs (dict): the keywords.
        reserved (Dict[str, str]): names the builder sets, with what to do instead.
    """
    allowed = constructor_kwargs(cls) - set(reserved)
    for name in kwargs:
        if name in reserved:
            raise TypeError(f"{where}: {name} is set by the builder ({reserved[name]})")
        if name not in allowed:
            raise TypeError(f"{where}: unexpected keyword argument {name!r}; the keywords passed "
                            f"on to {cls.__name__} are {sorted(allowed)}")  # fmt: skip


def check_choice(where: str, name: str, value, allowed: tuple) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{where}: {name} must be one of {allowed}, got {value!r}")


def check_num_classes(where: str, num_classes) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"{where}: num_classes must be an int >= 2 (background included), got "
                         f"{num_classes!r}")  # fmt: skip
