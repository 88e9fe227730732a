"""What the orchestrator lets a request cost, from the contracts: the stamping content cap and
the inference node's generation budget (pixels x steps, side, steps)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from stampflow.contracts.events import GenerationRequested
from stampflow.contracts.nodes import IoPolicy, NodeContract


@dataclass(frozen=True, slots=True)
class GenerationBudget:
    """What one generation may cost: the inference effect node's contract (None: no cap)."""

    max_pixel_steps: int | None = None  # width * height * num_inference_steps
    max_side: int | None = None
    max_steps: int | None = None

    @classmethod
    def from_policy(cls, policy: IoPolicy) -> GenerationBudget:
        return cls(policy.max_pixel_steps, policy.max_side, policy.max_steps)

    def refusal(self, request: GenerationRequested) -> str | None:
        """Why ``request`` is over budget, in one line naming the numbers; None if it fits."""
        w, h, steps = request.width, request.height, request.num_inference_steps
        if self.max_side is not None and max(w, h) > self.max_side:
            return (f"size {w}x{h}: a side of {max(w, h)} is over this node's cap of "
                    f"{self.max_side}")
        if self.max_steps is not None and steps > self.max_steps:
            return f"{steps} steps is over this node's cap of {self.max_steps} steps"
        if self.max_pixel_steps is not None and w * h * steps > self.max_pixel_steps:
            return (f"{w}x{h} at {steps} steps is {w * h * steps} pixel-steps, over this "
                    f"node's budget of {self.max_pixel_steps}")
        return None


@dataclass(frozen=True, slots=True)
class Limits:
    max_content_bytes: int
    generation: GenerationBudget = GenerationBudget()

    @classmethod
    def from_contracts(
        cls, contracts: Mapping[str, NodeContract], max_content_bytes: int
    ) -> Limits:
        """The stamping cap given; the generation budget from the inference node's contract."""
        inference = contracts.get("inference")
        budget = (GenerationBudget() if inference is None
                  else GenerationBudget.from_policy(inference.io_policy))
        return cls(max_content_bytes, budget)
