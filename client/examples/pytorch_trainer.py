"""Using logitd from a PyTorch trainer (the .proto is the contract).

    python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. proto/logitd/v1/teacher.proto
    PYTHONPATH=. python client/examples/pytorch_trainer.py localhost:50051

Fetches sparse teacher targets for a batch and computes the distillation loss
with the Gemma (renormalised) or RS-KD (counts) target, differentiably, against
a student's logits (random here; yours come from the student model).
"""
import math
import sys

import grpc
import torch
from logitd.v1 import teacher_pb2 as pb
from logitd.v1 import teacher_pb2_grpc as rpc


def fetch(stub, batch, step, k=256):
    """One SampleLogits call for a batch of token-id lists."""
    req = pb.SampleLogitsRequest(
        sequences=[pb.Sequence(token_ids=ids) for ids in batch],
        num_samples=k, seed=step, value_encoding=pb.VALUE_ENCODING_F32)
    return stub.SampleLogits(req, timeout=120)


def distill_loss(student_logits, seq, k, target="renormalized"):
    """-sum_i w_i log q_i averaged over positions, for one SampledSequence.

    student_logits: [positions, V] for positions first_position.. of the sequence.
    """
    offsets = torch.tensor(seq.offsets)
    ids = torch.tensor(seq.token_ids, dtype=torch.long)
    positions = len(offsets) - 1
    pos = torch.repeat_interleave(torch.arange(positions), offsets.diff())
    if target == "renormalized":           # Gemma: p_i / sum_S p
        p = torch.tensor(seq.logprobs).double().exp()
        w = p / torch.zeros(positions, dtype=p.dtype).index_add(0, pos, p)[pos]
    else:                                   # RS-KD: c_i / k, unbiased
        w = torch.tensor(seq.counts).double() / k
    logq = torch.log_softmax(student_logits.double(), dim=-1)[pos, ids]
    return -(w * logq).sum() / positions


def main():
    stub = rpc.TeacherStub(grpc.insecure_channel(sys.argv[1] if len(sys.argv) > 1 else "localhost:50051"))
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    batch = [[1589, 314, 253, 4569, 21902, 14494, 28], [504, 3458, 282]]
    resp = fetch(stub, batch, step=0)
    total = 0.0
    for seq in resp.sequences:
        n = len(seq.offsets) - 1
        student = torch.randn(n, info.vocab_size, requires_grad=True)
        loss = distill_loss(student, seq, resp.num_samples)
        loss.backward()
        # For full-vocabulary normalisation the gradient is q - w: each row sums to 0.
        assert torch.allclose(student.grad.sum(dim=-1), torch.zeros(n, dtype=student.grad.dtype), atol=1e-6)
        total += loss.item()
        covered = [sum(math.exp(lp) for lp in seq.logprobs[a:b]) for a, b in zip(seq.offsets, seq.offsets[1:])]
        print(f"positions {n}: loss {loss.item():.4f}, teacher mass covered {[round(c, 3) for c in covered]}")
    print(f"model {resp.model_id}, k {resp.num_samples}, seed {resp.seed}, mean loss {total / len(resp.sequences):.4f}")


if __name__ == "__main__":
    main()
