"""The string enums of the protocol, as ``Literal`` types."""

from __future__ import annotations

from typing import Literal

SamplingMethod = Literal["sample", "top_k", "none"]
"""How the server picks a position's ids (the proto's ``SamplingMethod``).

``"sample"``: i.i.d. draws with replacement; ``"top_k"``: the k most likely
ids, by descending logprob; ``"none"``: no ids, scoring alone.
"""

ValueEncoding = Literal["f32", "f16", "bf16"]
"""How log-probabilities travel on the wire (the proto's ``ValueEncoding``); decoded to float32."""

__all__ = ["SamplingMethod", "ValueEncoding"]
