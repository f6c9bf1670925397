"""logitd.TeacherClient against a real `logitd serve` (SmolLM2).

Expected values come from the Rust client (`logitd-client dump`, read with the
`safetensors` package, not with logitd), from `logitd info`, and from numpy
rounding of f32 values; never from the package under test.
"""

from __future__ import annotations

import _thread
import dataclasses
import json
import re
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
from conftest import REPO, Server, _binary, free_port, sequences, teacher_path
from safetensors.numpy import load_file

import logitd


def dump(logitd_client_bin, server, tmp_path, seqs, *, num_samples, seed, first_positions=None, extra=()):
    """Targets of `seqs` written by the Rust client (`logitd-client dump`), as
    one dict of numpy columns read with the safetensors package."""
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i, s in enumerate(seqs):
            if first_positions is None:
                f.write(json.dumps(s) + "\n")
            else:
                f.write(json.dumps({"token_ids": s, "first_position": first_positions[i]}) + "\n")
    out = tmp_path / "shards"
    argv = [
        str(logitd_client_bin), "dump", "--server", server.uri, "--input", str(corpus),
        "--out", str(out), "--num-samples", str(num_samples), "--seed", str(seed),
        "--batch-sequences", "3", *extra,
    ]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"dump failed: {r.stderr}"
    files = sorted(out.glob("targets-*.safetensors"))
    assert files, f"no shards in {out}"
    parts = [load_file(str(f)) for f in files]
    # Concatenate shards (offsets rebased).
    cols = {k: [] for k in ("sequence_offsets", "first_position", "offsets", "token_ids", "counts", "logprobs", "lse")}
    pos_base = entry_base = 0
    for i, p in enumerate(parts):
        so, off = p["sequence_offsets"].astype(np.int64), p["offsets"].astype(np.int64)
        cols["sequence_offsets"].append((so if i == 0 else so[1:]) + pos_base)
        cols["offsets"].append((off if i == 0 else off[1:]) + entry_base)
        for k in ("first_position", "token_ids", "counts", "logprobs", "lse"):
            cols[k].append(p[k])
        pos_base += len(p["lse"])
        entry_base += len(p["token_ids"])
    return {k: np.concatenate(v) for k, v in cols.items()}, out


def assert_same(t: logitd.Targets, ref: dict):
    """Bit-for-bit equality with the Rust client's columns."""
    assert t.offsets.dtype == np.int64 and t.token_ids.dtype == np.int64
    assert t.counts.dtype == np.int32 and t.logprobs.dtype == np.float32 and t.lse.dtype == np.float32
    np.testing.assert_array_equal(t.offsets, ref["offsets"])
    np.testing.assert_array_equal(t.seq_offsets, ref["sequence_offsets"])
    np.testing.assert_array_equal(t.first_positions, ref["first_position"])
    np.testing.assert_array_equal(t.token_ids, ref["token_ids"])
    np.testing.assert_array_equal(t.counts, ref["counts"])
    # Bits, not values: equal f32 bit patterns.
    np.testing.assert_array_equal(t.logprobs.view(np.uint32), ref["logprobs"].view(np.uint32))
    np.testing.assert_array_equal(t.lse.view(np.uint32), ref["lse"].view(np.uint32))


def test_model_info_is_what_the_server_reports(client):
    info = subprocess.run(
        [str(_binary("logitd", "LOGITD_BIN")), "info", "--model", str(teacher_path())],
        capture_output=True, text=True, timeout=300, check=True,
    )
    want = json.loads(info.stdout)
    got = client.model_info()
    assert isinstance(got, logitd.ModelInfo)
    # Every field of the proto's ModelInfo, under its proto name.
    proto = (REPO / "proto/logitd/v1/teacher.proto").read_text()
    message = re.search(r"message ModelInfo \{(.*?)\n\}", proto, re.S).group(1)
    proto_fields = re.findall(r"^\s*(?:string|uint32|uint64|bool|float)\s+(\w+)\s*=", message, re.M)
    assert [f.name for f in dataclasses.fields(got)] == proto_fields
    assert got.vocab_size == want["vocab_size"] == 49152
    for name in ("model_id", "max_sequence_length", "tokenizer_sha256", "default_num_samples", "max_num_samples"):
        assert getattr(got, name) == want[name], name
    assert got.max_candidates > 0 and got.architecture and got.dtype and got.device
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.vocab_size = 1  # type: ignore[misc]


@pytest.mark.parametrize("num_samples,seed", [(64, 7), (256, 12345)])
def test_targets_equal_the_rust_clients_bit_for_bit(client, server, logitd_client_bin, tmp_path, num_samples, seed):
    seqs = sequences(11, salt=seed)
    ref, _ = dump(logitd_client_bin, server, tmp_path, seqs, num_samples=num_samples, seed=seed)
    t = client.sample(seqs, num_samples=num_samples, seed=seed)
    assert len(t) == 11 and t.num_samples == num_samples
    np.testing.assert_array_equal(t.lengths, [len(s) for s in seqs])
    assert_same(t, ref)
    # Counts sum to k at every position (sample mode).
    sums = np.add.reduceat(t.counts, t.offsets[:-1])
    assert (sums == num_samples).all()


def test_first_positions_and_top_k_equal_the_rust_clients(client, server, logitd_client_bin, tmp_path):
    seqs = sequences(6, salt=3)
    first = [i % len(s) for i, s in enumerate(seqs)]
    ref, _ = dump(logitd_client_bin, server, tmp_path, seqs, num_samples=16, seed=9, first_positions=first, extra=("--top-k",))
    t = client.sample(seqs, num_samples=16, seed=9, first_position=first, method="top_k")
    assert_same(t, ref)
    np.testing.assert_array_equal(t.first_positions, first)


def test_every_input_form_gives_the_same_targets(client):
    import torch

    seqs = sequences(5, salt=1)
    want = client.sample(seqs, num_samples=32, seed=5)
    lengths = np.array([len(s) for s in seqs])
    padded = np.zeros((5, lengths.max()), np.int64)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
        padded[i, len(s) :] = 7  # pad id: must be ignored
    mask = (np.arange(padded.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
    forms = {
        "numpy rows": [np.array(s, np.int32) for s in seqs],
        "padded + lengths": dict(sequences=padded, lengths=lengths),
        "padded + mask": dict(sequences=padded, attention_mask=mask),
        "torch + mask": dict(sequences=torch.from_numpy(padded), attention_mask=torch.from_numpy(mask)),
    }
    for name, form in forms.items():
        kw = form if isinstance(form, dict) else dict(sequences=form)
        got = client.sample(**kw, num_samples=32, seed=5)
        for f in ("offsets", "token_ids", "counts", "logprobs", "lse", "seq_offsets", "lengths"):
            np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f"{name}: {f}")


def test_half_encodings_are_the_f32_values_rounded(client):
    """f16 / bf16 on the wire: the f32 logprobs rounded to nearest-even (numpy's
    float16; bfloat16 by bit arithmetic), same ids and counts."""
    seqs = sequences(4, salt=2)
    f32 = client.sample(seqs, num_samples=64, seed=3)
    f16 = client.sample(seqs, num_samples=64, seed=3, value_encoding="f16")
    bf16 = client.sample(seqs, num_samples=64, seed=3, value_encoding="bf16")
    for t in (f16, bf16):
        np.testing.assert_array_equal(t.token_ids, f32.token_ids)
        np.testing.assert_array_equal(t.counts, f32.counts)
    np.testing.assert_array_equal(f16.logprobs, f32.logprobs.astype(np.float16).astype(np.float32))
    bits = f32.logprobs.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    np.testing.assert_array_equal(bf16.logprobs, rounded.astype(np.uint32).view(np.float32))


def test_a_bad_token_id_raises_invalid_argument_with_the_servers_message(client):
    with pytest.raises(logitd.InvalidArgument) as e:
        client.sample([[1, 2, 3], [5, 99999999, 6]], num_samples=8)
    assert e.value.code == "INVALID_ARGUMENT"
    assert "99999999" in str(e.value) and "49152" in str(e.value)
    assert e.value.attempts == 1, "INVALID_ARGUMENT is never retried"
    assert isinstance(e.value, ValueError)


def test_a_first_position_past_the_end_names_it(client):
    with pytest.raises(logitd.InvalidArgument) as e:
        client.sample([[1, 2, 3]], first_position=3, num_samples=8)
    assert e.value.code == "INVALID_ARGUMENT" and "3" in e.value.message


def test_client_side_checks_name_the_value(client):
    with pytest.raises(logitd.InvalidArgument, match="-4"):
        client.sample([[1, -4, 3]])
    with pytest.raises(logitd.InvalidArgument, match="method 'beam'|method \"beam\""):
        client.sample([[1, 2]], method="beam")
    with pytest.raises(logitd.InvalidArgument, match="value_encoding"):
        client.sample([[1, 2]], value_encoding="f8")
    with pytest.raises(logitd.InvalidArgument, match="row 1 is not right-padded"):
        client.sample(np.ones((2, 3), np.int64), attention_mask=np.array([[1, 1, 0], [0, 1, 1]]))
    with pytest.raises(logitd.InvalidArgument, match="float"):
        client.sample([np.array([1.5, 2.0])])


def test_tokenizer_and_vocab_mismatch_are_refused(server, client):
    sha = client.model_info().tokenizer_sha256
    assert logitd.TeacherClient(server.uri, expect_tokenizer_sha256=sha.upper()).model_info().vocab_size == 49152
    with pytest.raises(logitd.TokenizerMismatch) as e:
        logitd.TeacherClient(server.uri, expect_tokenizer_sha256="ab" * 32)
    assert sha in str(e.value) and "ab" * 32 in str(e.value)
    with pytest.raises(logitd.VocabMismatch, match="49152"):
        logitd.TeacherClient(server.uri, expect_vocab_size=32000)


def test_a_wrong_bearer_token_is_unauthenticated(tmp_path):
    s = Server(extra=("--auth-token", "s3cret-token"))
    try:
        ok = logitd.TeacherClient(s.uri, bearer_token="s3cret-token")
        assert len(ok.sample([[1, 2, 3]], num_samples=4)) == 1
        with pytest.raises(logitd.Unauthenticated) as e:
            logitd.TeacherClient(s.uri, bearer_token="wrong")
        assert e.value.code == "UNAUTHENTICATED"
    finally:
        s.stop()


class BlackHole:
    """A TCP port that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_the_gil_is_released_while_a_call_waits():
    hole = BlackHole()
    ticks = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    t = threading.Thread(target=spin)
    t.start()
    try:
        start = time.monotonic()
        with pytest.raises(logitd.DeadlineExceeded):
            logitd.TeacherClient(f"http://127.0.0.1:{hole.port}", timeout_s=1.0, max_attempts=1)
        waited = time.monotonic() - start
        before = ticks[0]
        assert 0.9 < waited < 10, waited
        # ~1000 ticks/s if the thread runs freely; none if the GIL were held.
        assert before > 200 * waited, f"the other thread ticked {before} times in {waited:.2f} s"
    finally:
        stop.set()
        t.join(5)
        hole.close()


def test_ctrl_c_interrupts_a_waiting_call():
    hole = BlackHole()
    # Python's own SIGINT handler (a background job may have inherited SIGINT ignored,
    # and then interrupt_main does nothing).
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        timer = threading.Timer(0.5, _thread.interrupt_main)
        timer.start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            logitd.TeacherClient(f"http://127.0.0.1:{hole.port}", timeout_s=30.0)
        assert time.monotonic() - start < 3.0
    finally:
        signal.signal(signal.SIGINT, old)
        hole.close()


def test_a_server_restarted_mid_run_is_retried():
    s = Server(port=free_port())
    try:
        c = logitd.TeacherClient(s.uri, max_attempts=30, timeout_s=60.0)
        seqs = sequences(4, salt=8)
        want = [c.sample(seqs, num_samples=32, seed=i) for i in range(3)]
        results, errors = [], []
        go = threading.Event()

        def loop():
            go.set()
            for round_ in range(40):
                try:
                    results.append((round_ % 3, c.sample(seqs, num_samples=32, seed=round_ % 3)))
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)

        t = threading.Thread(target=loop)
        t.start()
        go.wait(10)
        time.sleep(0.3)
        s.stop(signal.SIGKILL)
        at_kill = len(results)
        time.sleep(1.0)
        s.start()
        t.join(180)
        assert not t.is_alive(), "calls did not finish within 180 s"
        assert not errors, f"calls failed across the restart: {errors!r}"
        assert len(results) == 40
        assert at_kill < 40, "the server went down only after the last call"
        for seed, got in results:
            np.testing.assert_array_equal(got.token_ids, want[seed].token_ids)
            np.testing.assert_array_equal(got.logprobs.view(np.uint32), want[seed].logprobs.view(np.uint32))
    finally:
        s.stop()


def _pki(dir_, name: str):
    """A CA and a server certificate for the name logitd.test only (openssl CLI)."""
    def run(*argv):
        r = subprocess.run(["openssl", *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"openssl {argv[0]} failed: {r.stderr}"

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca, ca_key = dir_ / f"{name}-ca.pem", dir_ / f"{name}-ca.key"
    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", f"/CN={name} test CA")
    key, csr, cert = dir_ / f"{name}.key", dir_ / f"{name}.csr", dir_ / f"{name}.pem"
    run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=logitd.test")
    ext = dir_ / f"{name}.ext"
    ext.write_text(
        "subjectAltName=DNS:logitd.test\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca, cert, key


def test_tls_with_a_ca_and_a_domain(client, tmp_path):
    ca, cert, key = _pki(tmp_path, "good")
    other_ca, _, _ = _pki(tmp_path, "other")
    s = Server(extra=("--tls-cert", str(cert), "--tls-key", str(key)))
    try:
        seqs = sequences(3, salt=5)
        want = client.sample(seqs, num_samples=16, seed=2)
        tls = {"ca": ca, "domain": "logitd.test"}
        got = logitd.TeacherClient(f"https://127.0.0.1:{s.port}", tls=tls).sample(seqs, num_samples=16, seed=2)
        np.testing.assert_array_equal(got.token_ids, want.token_ids)
        np.testing.assert_array_equal(got.logprobs.view(np.uint32), want.logprobs.view(np.uint32))
        # host:port without a scheme means https with tls
        assert logitd.TeacherClient(f"127.0.0.1:{s.port}", tls=tls).model_info().vocab_size == 49152
        # Another CA, or the right CA without the certificate's name: refused, not retried.
        for bad in ({"ca": other_ca, "domain": "logitd.test"}, str(ca)):
            with pytest.raises(logitd.Unavailable, match="invalid peer certificate") as e:
                logitd.TeacherClient(f"https://127.0.0.1:{s.port}", tls=bad)
            assert e.value.attempts == 1, "a refused certificate is not retried"
        with pytest.raises(logitd.ConfigError, match="CA certificate"):
            logitd.TeacherClient(f"https://127.0.0.1:{s.port}", tls=tmp_path / "missing.pem")
    finally:
        s.stop()


# Mistakes a new user makes get an InvalidArgument that says what to do, before
# anything is sent (issue 34's fresh-clone trial).


def test_text_instead_of_ids_says_to_tokenize(client):
    for bad in ("It is a truth", ["It is a truth", "universally"], [[1, 2], "three"], b"bytes"):
        with pytest.raises(logitd.InvalidArgument, match="tokenize first") as e:
            client.sample(bad)
        assert "truth" not in str(e.value) and "three" not in str(e.value), "the text is echoed back"


def test_an_empty_batch_is_refused(client):
    with pytest.raises(logitd.InvalidArgument, match="no sequences"):
        client.sample([])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_samples": -1}, r"num_samples = -1 is outside 0\.\.=4294967295"),
        ({"num_samples": 2**32}, r"num_samples = 4294967296 is outside"),
        ({"num_samples": 2.5}, r"num_samples must be an integer, got float 2\.5"),
        ({"seed": -3}, r"seed = -3 is outside 0\.\.=18446744073709551615"),
        ({"seed": 2**64}, r"seed = 18446744073709551616 is outside"),
    ],
)
def test_out_of_range_options_name_the_value(client, options, message):
    with pytest.raises(logitd.InvalidArgument, match=message):
        client.sample([[1, 2, 3]], **options)
    with pytest.raises(logitd.InvalidArgument, match=message):
        logitd.Prefetcher(client, [[[1, 2, 3]]], **options)


def test_text_arrays_and_lists_of_words_say_to_tokenize(client):
    for bad in ([["It", "is", "a", "truth"]], np.array([["It", "is"], ["a", "truth"]]), [np.array(["truth"])]):
        with pytest.raises(logitd.InvalidArgument, match="tokenize first") as e:
            client.sample(bad)
        assert "truth" not in str(e.value), "the text is echoed back"


def test_an_empty_batch_is_refused_by_the_prefetcher_too(client):
    with logitd.Prefetcher(client, [[[1, 2, 3]], []]) as p:
        batch, t = next(p)
        assert batch == [[1, 2, 3]] and len(t) == 1
        with pytest.raises(logitd.InvalidArgument, match="batch 1 has no sequences"):
            next(p)


def test_num_samples_minus_one_says_none_means_the_default(client):
    with pytest.raises(logitd.InvalidArgument, match=r"num_samples = -1 .*None for the server's default"):
        client.sample([[1, 2, 3]], num_samples=-1)


def test_num_samples_none_is_the_servers_default():
    """num_samples=None (the default) sends 0, and the server's --default-num-samples
    applies: a server started with 8 (not the built-in default, not the old
    Python default of 256) draws 8 per position, in sample() and the Prefetcher."""
    s = Server(extra=("--default-num-samples", "8"))
    try:
        c = logitd.TeacherClient(s.uri, timeout_s=120.0)
        assert c.model_info().default_num_samples == 8
        seqs = sequences(3, salt=5)
        for t in (c.sample(seqs), c.sample(seqs, num_samples=None), next(logitd.Prefetcher(c, [seqs]))[1]):
            assert t.num_samples == 8
            per_position = np.add.reduceat(t.counts, t.offsets[:-1].astype(np.intp))
            assert (per_position == 8).all(), per_position
        assert c.sample(seqs, num_samples=5).num_samples == 5  # an explicit k still wins
    finally:
        s.stop()


def test_close_and_the_context_manager(server):
    with logitd.TeacherClient(server.uri, timeout_s=120.0) as c:
        assert not c.closed
        assert len(c.sample([[1, 2, 3]], num_samples=4)) == 1
    assert c.closed
    for call in (
        lambda: c.sample([[1, 2, 3]]),
        c.model_info,
        lambda: logitd.Prefetcher(c, [[[1, 2, 3]]]),
        lambda: c.__enter__(),
    ):
        with pytest.raises(logitd.ClientClosed, match="closed.*create a new TeacherClient"):
            call()
    assert issubclass(logitd.ClientClosed, logitd.LogitdError)
    c.close()  # twice is fine
    c2 = logitd.TeacherClient(server.uri, timeout_s=120.0)
    c2.close()
    with pytest.raises(logitd.ClientClosed):
        c2.sample([[1, 2, 3]])


def test_all_is_the_old_public_names_plus_the_additions():
    before = ["TeacherClient", "Targets", "PaddedTargets", "Prefetcher", "sequence_seed", "shards", "errors"]
    before += [e for e in logitd.errors.__all__ if e != "ClientClosed"]
    assert logitd.__all__ == before + ["ClientClosed", "ModelInfo", "SamplingMethod", "ValueEncoding"]
    for name in logitd.__all__:
        assert getattr(logitd, name) is not None, name
