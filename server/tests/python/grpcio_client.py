"""An independent logitd client: Python grpcio with stubs generated from the
.proto at run time (grpc_tools.protoc). Calls GetModelInfo and SampleLogits and
prints one JSON object with what it got, for the Rust test to compare.

    python3 grpcio_client.py HOST:PORT PROTO_ROOT SEED
"""
import json
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc


def main():
    addr, proto_root, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out = tempfile.mkdtemp(prefix="logitd-stubs-")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", "logitd/v1/teacher.proto"])
    assert rc == 0, f"protoc failed: {rc}"
    # A regular package (with __init__.py), so that the stubs win over an installed
    # `logitd` Python package (client/python), which would hide a namespace package.
    for pkg in ("logitd", os.path.join("logitd", "v1")):
        open(os.path.join(out, pkg, "__init__.py"), "a").close()
    sys.path.insert(0, out)
    from logitd.v1 import teacher_pb2 as pb
    from logitd.v1 import teacher_pb2_grpc as rpc

    with grpc.insecure_channel(addr) as channel:
        stub = rpc.TeacherStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        req = pb.SampleLogitsRequest(
            sequences=[pb.Sequence(token_ids=[3, 1, 4, 1, 5, 9, 2, 6], first_position=2),
                       pb.Sequence(token_ids=[2, 7, 1, 8], seed=11)],
            num_samples=32, temperature=0.8, seed=seed,
            method=pb.SAMPLING_METHOD_SAMPLE, value_encoding=pb.VALUE_ENCODING_F32)
        resp = stub.SampleLogits(req, timeout=30)
        try:
            stub.SampleLogits(pb.SampleLogitsRequest(), timeout=30)
            invalid = None
        except grpc.RpcError as e:
            invalid = {"code": e.code().name, "message": e.details()}
    print(json.dumps({
        "vocab_size": info.vocab_size,
        "model_id": info.model_id,
        "seed": resp.seed,
        "num_samples": resp.num_samples,
        "sequences": [{"first_position": s.first_position, "offsets": list(s.offsets),
                       "token_ids": list(s.token_ids), "counts": list(s.counts),
                       "logprobs": list(s.logprobs), "lse": list(s.lse)} for s in resp.sequences],
        "invalid": invalid,
    }))


if __name__ == "__main__":
    main()
