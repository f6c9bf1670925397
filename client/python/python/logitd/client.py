"""The teacher client: the connection, the teacher's ModelInfo and its targets."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from . import _native
from ._types import SamplingMethod, ValueEncoding
from ._validate import bounded_int, candidates_csr, endpoint_uris, first_positions, flatten, num_samples_arg
from .errors import ClientClosed, ConfigError, InvalidArgument
from .targets import Targets


def sequence_seed(batch_seed: int, index: int) -> int:
    """Returns the seed sequence ``index`` of a batch with seed ``batch_seed`` is sent with.

    This is the derivation of the Rust client and of ``logitd-client dump``.
    """
    return _native.sequence_seed(batch_seed, index)


@dataclass(frozen=True)
class ModelInfo:
    """The teacher as its server described it on connect (the proto's ``ModelInfo``).

    Attributes:
        model_id: Identifies the teacher (a name plus a digest of its weights).
        architecture: The architecture, e.g. ``"llama"``, ``"gemma3"``.
        vocab_size: Number of token ids the teacher scores.
        max_sequence_length: Longest sequence the server accepts.
        dtype: What is served: ``"f32"``, ``"bf16"``, or for weights kept as
            the file stores them their types and the activations', e.g.
            ``"q4_k+q6_k/f32-acc"`` (a Q4_K_M GGUF file) or ``"bf16/f32-acc"``
            (a bf16 checkpoint on the CPU).
        device: Device the teacher runs on, e.g. ``"cpu"``, ``"cuda:0"``.
        tokenizer_sha256: SHA-256 (hex) of the tokenizer, so a trainer can
            refuse a mismatch.
        default_num_samples: The k of a call that leaves ``num_samples`` at
            None (the server's ``--default-num-samples``).
        max_num_samples: Largest k the server accepts.
        max_candidates: Most candidate ids a call may name for one position.
    """

    model_id: str
    architecture: str
    vocab_size: int
    max_sequence_length: int
    dtype: str
    device: str
    tokenizer_sha256: str
    default_num_samples: int
    max_num_samples: int
    max_candidates: int

    @classmethod
    def _from_native(cls, d: Mapping[str, Any]) -> ModelInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) != names:
            # The extension and the package come from one build; this is a bug.
            raise RuntimeError(f"the native ModelInfo has fields {sorted(d)}, expected {sorted(names)}")
        return cls(**d)


class TeacherClient:
    """A logitd teacher: one or several servers behind one balanced channel.

    Connecting fetches the server's ModelInfo (with retries) and runs the
    checks. ``close()`` (or leaving a ``with TeacherClient(...) as teacher:``
    block) lets the connections go; a call after that raises
    :class:`~logitd.errors.ClientClosed`.

    Args:
        endpoints: A URI (``"http://10.0.0.7:50051"``; ``"host:port"`` means
            http, or https with ``tls``) or a list of them, balanced per call.
        bearer_token: Sent as ``authorization: Bearer <token>``.
        tls: None (plaintext), the path of a PEM CA certificate the server's
            certificate must chain to, or a dict with ``ca`` (path), ``domain``
            (the name to verify instead of the endpoint's host), ``cert`` and
            ``key`` (paths of a client certificate for mutual TLS).
        expect_tokenizer_sha256: Refuse (TokenizerMismatch) a server with
            another tokenizer digest.
        expect_vocab_size: Refuse (VocabMismatch) a server with another
            vocabulary size.
        timeout_s: The deadline of each call (DeadlineExceeded after it).
        max_attempts: Attempts per call; UNAVAILABLE, RESOURCE_EXHAUSTED and
            broken connections are retried with jittered exponential backoff.
        max_sequences_per_request: Larger batches are split into requests of
            at most this many sequences.
        max_concurrent_requests: How many of those requests are in flight at once.
    """

    def __init__(
        self,
        endpoints: str | os.PathLike[str] | Sequence[str],
        *,
        bearer_token: str | None = None,
        tls: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str] | None] | None = None,
        expect_tokenizer_sha256: str | None = None,
        expect_vocab_size: int | None = None,
        timeout_s: float = 60.0,
        max_attempts: int = 8,
        max_sequences_per_request: int = 64,
        max_concurrent_requests: int = 8,
    ) -> None:
        self._client: _native.Client | None = None
        if isinstance(tls, bool):
            raise ConfigError("tls=True: give the path of the CA certificate (or a dict with ca/domain/cert/key)")
        if tls is None:
            tls_args: dict[str, str | None] = {}
        elif isinstance(tls, Mapping):
            unknown = set(tls) - {"ca", "domain", "cert", "key"}
            if unknown:
                raise ConfigError(f"unknown tls keys {sorted(unknown)} (ca, domain, cert, key)")
            tls_args = {f"tls_{k}": (None if v is None else os.fspath(v)) for k, v in tls.items()}
        else:
            tls_args = {"tls_ca": os.fspath(tls)}
        self._client = _native.Client(
            endpoint_uris(endpoints, tls is not None),
            bearer_token=bearer_token,
            expect_tokenizer_sha256=expect_tokenizer_sha256,
            expect_vocab_size=expect_vocab_size,
            timeout_s=float(timeout_s),
            max_attempts=int(max_attempts),
            max_sequences_per_request=int(max_sequences_per_request),
            max_concurrent_requests=int(max_concurrent_requests),
            **tls_args,
        )
        self._info = ModelInfo._from_native(self._client.model_info())

    @property
    def _native(self) -> _native.Client:
        """The native client, or ClientClosed after ``close()``."""
        if self._client is None:
            raise ClientClosed(
                "this TeacherClient is closed (close() or the end of its `with` block): "
                "create a new TeacherClient to call the teacher again"
            )
        return self._client

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._client is None

    def close(self) -> None:
        """Lets the connections go; calls after this raise ClientClosed.

        Closing twice is fine. A Prefetcher made from this client keeps its own
        stream until it is closed itself.
        """
        self._client = None

    def __enter__(self) -> TeacherClient:
        self._native  # noqa: B018  (ClientClosed when entered after close())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"TeacherClient(model_id={self._info.model_id!r}, {state})"

    def model_info(self) -> ModelInfo:
        """Returns what the server reported on connect (see :class:`ModelInfo`).

        Raises:
            ClientClosed: After ``close()``.
        """
        self._native  # noqa: B018  (ClientClosed after close())
        return self._info

    def sample(
        self,
        sequences: Any,
        *,
        num_samples: int | None = None,
        temperature: float | None = 1.0,
        seed: int = 0,
        first_position: int | Sequence[int] | Any = 0,
        method: SamplingMethod = "sample",
        value_encoding: ValueEncoding = "f32",
        lengths: Any = None,
        attention_mask: Any = None,
        token_logprobs: bool = False,
        candidates: Any = None,
    ) -> Targets:
        """Returns the teacher targets of every position from ``first_position`` on of each sequence.

        Large batches are split into concurrent requests and reassembled in order.

        On-policy scoring (see :class:`Targets` and :class:`PaddedTargets`):
        ``token_logprobs=True`` gives the teacher's log p and rank of the
        realised next token at every returned position (position t scores
        token t + 1); ``candidates`` gives the teacher's log p of ids of the
        caller's choosing.

        Args:
            sequences: Token ids: a list of lists or 1-D arrays, or a padded
                2-D array / tensor with ``lengths`` or a right-padded
                ``attention_mask``. Not text: tokenize first.
            num_samples: Draws per position (k). None (or 0) means the
                server's default, ``model_info().default_num_samples``.
            temperature: Softmax temperature; None means the server's default.
            seed: The batch seed; sequence b is sampled with
                ``sequence_seed(seed, b)``, so results do not depend on how the
                batch is split into requests.
            first_position: The first position with targets, one for the
                batch or one per sequence.
            method: ``"sample"`` (i.i.d. draws), ``"top_k"`` (the k most
                likely ids, by descending logprob, counts 1) or ``"none"`` (no
                ids at all: scoring alone, with ``token_logprobs`` and/or
                ``candidates``; ``num_samples`` is ignored and the targets' is 0).
            value_encoding: ``"f32"``, ``"f16"`` or ``"bf16"`` on the wire
                (decoded to float32; token and candidate log-probabilities are
                always f32).
            lengths: With a padded 2-D batch: each row's length.
            attention_mask: With a padded 2-D batch: ones then zeros per row.
            token_logprobs: Score the realised next token of every position.
            candidates: Ids whose teacher log p to return, in the layout of
                the padded targets: row ``t`` of sequence ``b`` holds the ids
                for position ``t`` (the distribution of token ``t + 1``), e.g.
                the student's top-k, ``student_logits.topk(c).indices``. Either
                one int array / tensor ``[B, T, C]`` (T at least every
                sequence's length, C ids at every position), or a list with one
                entry per sequence: None (none), an int array ``[L_b, C_b]``, or
                a list of ``L_b`` per-position lists of ids (any number each,
                None or ``[]`` for none), ``L_b`` the sequence's length. Only
                rows from ``first_position`` to the sequence's end are sent;
                the others may hold anything (e.g. padding). Ids may repeat and
                come in any order; at most ``model_info().max_candidates`` per
                position, each below the vocabulary size.

        Returns:
            The targets of the batch, in the order of ``sequences``.

        Raises:
            InvalidArgument: A mistake in the arguments (text instead of token
                ids, an empty batch, ``num_samples`` or ``seed`` out of range,
                an unknown ``method`` ...), before anything is sent; or the
                server's INVALID_ARGUMENT. Messages name the sequence, the
                position and the value.
            ClientClosed: After ``close()``.
        """
        native = self._native
        flat, lens = flatten(sequences, lengths, attention_mask)
        if len(lens) == 0:
            raise InvalidArgument(
                "no sequences: sample() needs at least one sequence of token ids, got an empty batch"
            )
        k = num_samples_arg(num_samples)
        seed = bounded_int("seed", seed, 2**64 - 1)
        first = first_positions(first_position, len(lens))
        cand_offsets = cand_ids = None
        if candidates is not None:
            cand_offsets, cand_ids = candidates_csr(candidates, lens, first)
        return Targets(
            *native.sample(
                flat,
                lens,
                first,
                num_samples=k,
                temperature=None if temperature is None else float(temperature),
                seed=seed,
                method=method,
                value_encoding=value_encoding,
                token_logprobs=bool(token_logprobs),
                candidate_offsets=cand_offsets,
                candidate_ids=cand_ids,
            )
        )
