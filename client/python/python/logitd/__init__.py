"""logitd for Python trainers: sampled teacher targets from a logitd server.

The core is the Rust client crate (``logitd-client``) through PyO3: balancing
over several servers, retries with backoff, deadlines, the tokenizer check,
the streaming prefetcher and the shard reader. Replies arrive as numpy arrays
(no per-element Python objects); ``PaddedTargets.to_torch`` hands them to
PyTorch. Waiting calls release the GIL, and Ctrl-C interrupts them.

    import logitd
    teacher = logitd.TeacherClient("http://127.0.0.1:50051")
    targets = teacher.sample(input_ids, attention_mask=attention_mask, num_samples=64, seed=step)
    padded = targets.padded().to_torch(device)   # [B, T, K] ids, logprobs, counts, mask

On-policy distillation: the teacher's log p of the tokens the student sampled
(row t of sequence b scores token t + 1, like the student's logits), and at
ids of the caller's choosing, with no sampling at all:

    targets = teacher.sample(rollouts, first_position=prompt_lens - 1, method="none",
                             token_logprobs=True, candidates=student_topk_ids)
    p = targets.padded().to_torch(device)  # token_logprobs/token_mask [B, T], candidate_logprobs [B, T, C]
"""


from . import _native, errors, shards
from ._types import SamplingMethod, ValueEncoding
from .client import ModelInfo, TeacherClient, sequence_seed
from .errors import (
    Cancelled,
    ClientClosed,
    ConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LogitdError,
    MalformedTargets,
    PermissionDenied,
    ResourceExhausted,
    ShardError,
    TokenizerMismatch,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    VocabMismatch,
)
from .prefetch import Prefetcher
from .targets import PaddedTargets, Targets

__version__: str = _native.__version__

# Written out (not built from errors.__all__) so that linters and type checkers
# see the re-exports; tests/test_client.py checks it against errors.__all__.
__all__ = [
    "TeacherClient",
    "Targets",
    "PaddedTargets",
    "Prefetcher",
    "sequence_seed",
    "shards",
    "errors",
    # the typed exceptions of logitd.errors, in its order
    "LogitdError",
    "InvalidArgument",
    "Unavailable",
    "ResourceExhausted",
    "DeadlineExceeded",
    "Unauthenticated",
    "PermissionDenied",
    "Cancelled",
    "FailedPrecondition",
    "Unimplemented",
    "Internal",
    "TokenizerMismatch",
    "VocabMismatch",
    "ConfigError",
    "MalformedTargets",
    "ShardError",
    "ClientClosed",
    # the protocol's ModelInfo and string enums
    "ModelInfo",
    "SamplingMethod",
    "ValueEncoding",
]
