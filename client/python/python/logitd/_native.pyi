"""Type stubs of the extension module ``logitd._native`` (Rust, PyO3).

Use the public API in ``logitd`` (typed inline in its modules); this
module is its core. ``_Columns`` is the tuple ``logitd.Targets`` is built from.
"""

from collections.abc import Iterator
from os import PathLike
from typing import Any, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "Client",
    "NativePrefetcher",
    "ShardIter",
    "distill_loss_reference",
    "pad",
    "sequence_seed",
    "decode_response",
    "rust_prefetch",
    "__version__",
]

__version__: str

_Columns = tuple[
    npt.NDArray[np.int64],  # offsets [P + 1]
    npt.NDArray[np.int64],  # token_ids [N]
    npt.NDArray[np.int32],  # counts [N]
    npt.NDArray[np.float32],  # logprobs [N]
    npt.NDArray[np.float32],  # lse [P]
    npt.NDArray[np.int64],  # seq_offsets [B + 1]
    npt.NDArray[np.int64],  # first_positions [B]
    npt.NDArray[np.int64],  # lengths [B]
    int,  # num_samples
    npt.NDArray[np.float32] | None,  # token_logprobs [P] (NaN where no next token)
    npt.NDArray[np.int32] | None,  # token_ranks [P] (0 where no next token)
    npt.NDArray[np.int64] | None,  # candidate_offsets [P + 1]
    npt.NDArray[np.float32] | None,  # candidate_logprobs [C]
]

@final
class Client:
    """The Rust ``logitd_client::TeacherClient``; connecting fetches ModelInfo
    (with retries) and runs the tokenizer / vocabulary checks."""

    def __new__(
        cls,
        endpoints: list[str],
        *,
        bearer_token: str | None = None,
        tls_ca: str | None = None,
        tls_domain: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        expect_tokenizer_sha256: str | None = None,
        expect_vocab_size: int | None = None,
        timeout_s: float = 60.0,
        max_attempts: int = 8,
        max_sequences_per_request: int = 64,
        max_concurrent_requests: int = 8,
    ) -> Client: ...
    def model_info(self) -> dict[str, Any]: ...
    def sample(
        self,
        flat: npt.NDArray[np.uint32],
        lengths: npt.NDArray[np.int64],
        first_positions: npt.NDArray[np.int64],
        *,
        num_samples: int,
        temperature: float | None,
        seed: int,
        method: str,
        value_encoding: str,
        token_logprobs: bool = False,
        candidate_offsets: npt.NDArray[np.int64] | None = None,
        candidate_ids: npt.NDArray[np.uint32] | None = None,
    ) -> _Columns:
        """``method``: "sample", "top_k" or "none". ``candidate_offsets`` /
        ``candidate_ids``: candidate ids CSR over every returned position of the
        batch (sequence by sequence), checked against the server's vocabulary
        and max_candidates (InvalidArgument naming sequence and position)."""

@final
class NativePrefetcher:
    """The Rust ``logitd_client::Prefetcher`` over ``source``, an iterator of
    ``(flat uint32 ids, int64 lengths, int64 first_positions, seed)``."""

    def __new__(
        cls,
        client: Client,
        source: Iterator[tuple[Any, Any, Any, int]],
        depth: int,
        *,
        num_samples: int,
        temperature: float | None,
        method: str,
        value_encoding: str,
        token_logprobs: bool = False,
    ) -> NativePrefetcher: ...
    def next_targets(self) -> _Columns: ...
    def close(self) -> None: ...

@final
class ShardIter:
    """The Rust ``logitd_client::shard::ShardReader`` over ``dirs``, ``batch_size``
    sequences per ``next_targets()`` (StopIteration at the end)."""

    def __new__(cls, dirs: list[str | PathLike[str]], batch_size: int = 64) -> ShardIter: ...
    @property
    def meta(self) -> dict[str, Any]: ...
    @property
    def files(self) -> list[str]: ...
    def next_targets(self) -> _Columns: ...

def pad(
    offsets: npt.NDArray[np.int64],
    token_ids: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int32],
    logprobs: npt.NDArray[np.float32],
    seq_offsets: npt.NDArray[np.int64],
    first_positions: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    k_max: int | None = None,
) -> tuple[
    npt.NDArray[np.int64],  # token_ids [B, T, K]
    npt.NDArray[np.float32],  # logprobs [B, T, K]
    npt.NDArray[np.int32],  # counts [B, T, K]
    npt.NDArray[np.bool_],  # mask [B, T, K]
    npt.NDArray[np.bool_],  # position_mask [B, T]
]: ...
def sequence_seed(batch_seed: int, index: int) -> int: ...
def distill_loss_reference(
    student_logits: npt.NDArray[np.float64] | npt.NDArray[np.float32],
    token_ids: npt.NDArray[np.int64],
    logprobs: npt.NDArray[np.float32],
    counts: npt.NDArray[np.int32],
    mask: npt.NDArray[np.bool_],
    num_samples: int,
    target: str = "renormalized",
    normalization: str = "full",
    position_weights: npt.NDArray[np.float32] | None = None,
) -> float:
    """The Rust ``logitd_client::distill_loss`` on padded rows, as a reference.

    ``student_logits`` is [N, V] (float64 or float32; computed in that dtype);
    ``token_ids`` / ``logprobs`` / ``counts`` / ``mask`` are [N, K]. Row p's
    sampled set is S_p = {j : mask[p, j]} and its loss
    l_p = -sum_{j in S_p} w_pj * log q_pj, with w the softmax of the logprobs
    over S_p (``target="renormalized"``) or counts / sum of counts over S_p
    (``"counts"``), and log q the log-softmax of the row's logits over all V
    (``normalization="full"``) or over the ids of S_p (``"sampled"``).

    Reduction: a weighted mean, sum_p m_p * l_p / sum_p m_p, where m_p is
    ``position_weights[p]`` (default 1) for rows with at least one entry and
    0 for rows without; 0.0 when every m_p is 0.
    """

# Benchmark helpers (client/python/bench), not part of the public API.
def decode_response(data: bytes) -> _Columns:
    """A serialized SampleLogitsResponse decoded into the Targets columns."""

def rust_prefetch(
    client: Client,
    flat: npt.NDArray[np.uint32],
    lengths: npt.NDArray[np.int64],
    batches: int,
    depth: int,
    num_samples: int,
    seed: int = 0,
) -> tuple[int, float]:
    """The Rust Prefetcher over ``batches`` copies of one batch, drained in Rust: (positions, seconds)."""
