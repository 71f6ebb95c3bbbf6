"""Techniques: how a unit or a node is shown. Each optimizable one is an objective, as in lucid.

An objective maps the node's activations for a batch (`NodeActivations`: maps of N x C x H x W
or N x F, and a token node's class token) and the unit of each batch element to one value per
element, to be maximized. Batch elements never interact, except within one unit's diversity
group, so a unit's image does not depend on its batch-mates. A caricature's objective is made
from the node's activations on a probe image (its target), one per batch element.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..errors import MicroscopeError
from ..limits import SettingError
from ..nodes import NodeActivations

Objective = Callable[[NodeActivations, torch.Tensor], torch.Tensor]


def _pick(act: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    return act[torch.arange(act.shape[0], device=act.device), units]


def channel(act: NodeActivations, units: torch.Tensor) -> torch.Tensor:
    """The mean of the unit's feature map (over the patch tokens for tokens; the unit's value
    for a vector)."""
    picked = _pick(act.maps, units)
    return picked.flatten(1).mean(1) if picked.dim() > 1 else picked


def neuron(act: NodeActivations, units: torch.Tensor) -> torch.Tensor:
    """The unit at the centre position of its feature map (the centre patch token)."""
    picked = _pick(act.maps, units)
    if picked.dim() == 1:
        return picked
    return picked[:, picked.shape[1] // 2, picked.shape[2] // 2]


def class_token(act: NodeActivations, units: torch.Tensor) -> torch.Tensor:
    """The unit (a feature) of the class token."""
    if act.cls is None:
        raise MicroscopeError("the class token technique needs a node of tokens with a class token")
    return _pick(act.cls, units)


def deepdream(act: NodeActivations, units: torch.Tensor) -> torch.Tensor:
    """The whole node: the mean square of all its activations."""
    return act.maps.square().flatten(1).mean(1)


def diversity_penalty(act: torch.Tensor, group: int) -> torch.Tensor:
    """lucid's diversity term, per batch element: the summed cosine similarity of its Gram matrix
    (style) to those of the other images of its group of `group` consecutive elements."""
    n = act.shape[0]
    flat = act.flatten(2) if act.dim() == 4 else act.unsqueeze(2)
    grams = torch.matmul(flat, flat.transpose(1, 2)).flatten(1)
    grams = F.normalize(grams, dim=1).view(n // group, group, -1)
    similarity = torch.matmul(grams, grams.transpose(1, 2))  # groups x group x group
    off_diagonal = similarity.sum(2) - similarity.diagonal(dim1=1, dim2=2)
    return off_diagonal.reshape(n)


CARICATURE_POWER = 2  # the cosine's exponent: how tightly the image keeps its target's direction
CARICATURE_FLOOR = 0.1  # lucid's: the cosine counts at least this much


def dot_and_cosine(maps: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch element, the dot product of its map (or vector) with its target's, and their
    cosine."""
    maps, targets = maps.flatten(1), targets.flatten(1)
    dot = (maps * targets).sum(1)
    return dot, dot / (maps.norm(dim=1) * targets.norm(dim=1)).clamp_min(1e-12)


def caricature(targets: torch.Tensor, power: float = CARICATURE_POWER) -> Objective:
    """lucid's caricature objective (`dot_compare`): dot(act, target) x cosine(act, target)^power
    over the node's whole map, batch element i against `targets[i]` (the node's activations on
    its probe image). The dot product grows the activations, the cosine keeps them pointing
    where the image's do: what the node sees in the image, exaggerated. (lucid divides the dot
    product by the target's norm alone, a projection; this is the cosine, floored as lucid's.)"""

    def objective(act: NodeActivations, units: torch.Tensor) -> torch.Tensor:
        dot, cos = dot_and_cosine(act.maps, targets)
        return dot * cos.clamp_min(CARICATURE_FLOOR) ** power

    return objective


def cosine(targets: torch.Tensor) -> Objective:
    """The cosine similarity of each batch element's whole map to `targets[i]`."""
    return lambda act, units: dot_and_cosine(act.maps, targets)[1]


def _unbound(act: NodeActivations, units: torch.Tensor) -> torch.Tensor:
    raise MicroscopeError(
        "a caricature compares the node's activations with those on a probe image: render it "
        "with tb_microscope.render(run, step, node, [], 'caricature', image=i)"
    )


@dataclass(frozen=True)
class Technique:
    name: str
    objective: Objective | None  # None: not an optimization (examples, weights)
    images_per_unit: int = 1
    whole_node: bool = False  # one image for the node; units are ignored
    diversity: float = 0.0  # weight of the diversity term, relative to the objective's size
    class_token: bool = False  # needs a node of tokens with a class token
    # units are probe images; the objective is made from the node's activations on them
    compare: Callable[[torch.Tensor], Objective] | None = None

    @property
    def compares(self) -> bool:
        """Whether the technique's units are probe images (a caricature)."""
        return self.compare is not None

    def bound(self, targets: torch.Tensor) -> Technique:
        """This technique of probe images with its objective made from `targets`, the node's
        activations on them (batch element i's at i)."""
        return replace(self, objective=self.compare(targets), compare=None)

    def value(self, act: NodeActivations, units: torch.Tensor) -> torch.Tensor:
        """The quantity to maximize, per batch element."""
        value = self.objective(act, units)
        if self.diversity:
            penalty = diversity_penalty(act.maps, self.images_per_unit)
            value = value - self.diversity * value.detach().abs().clamp_min(1e-3) * penalty
        return value


def _negative(objective: Objective) -> Objective:
    return lambda act, units: -objective(act, units)


TECHNIQUES: dict[str, Technique] = {
    t.name: t
    for t in [
        Technique("channel", channel),
        Technique("neuron", neuron),
        Technique("negative_channel", _negative(channel)),
        Technique("negative_neuron", _negative(neuron)),
        Technique("class_token", class_token, class_token=True),
        Technique("diversity", channel, images_per_unit=4, diversity=0.5),
        Technique("deepdream", deepdream, whole_node=True),
        Technique("caricature", _unbound, compare=caricature),
        Technique("examples", None),
        Technique("weights", None),
    ]
}
OPTIMIZED = [name for name, t in TECHNIQUES.items() if t.objective is not None]


def get_technique(name: str) -> Technique:
    try:
        return TECHNIQUES[name]
    except KeyError:
        raise SettingError(
            f"technique {name!r} is not known; techniques: {', '.join(TECHNIQUES)}"
        ) from None
