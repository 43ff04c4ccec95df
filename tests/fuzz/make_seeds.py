#!/usr/bin/env python3
"""Writes the fuzz corpora (tests/fuzz/corpus/<target>/): hand-made seeds (seed-*) and the inputs
that reproduced bugs the fuzzers found, since fixed (regress-*).

Run from anywhere: python3 tests/fuzz/make_seeds.py (rewrites those files; nothing else in the
folders is touched). See docs/fuzzing.md.
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def write(target, name, data, prefix="seed-"):
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    path = os.path.join(CORPUS, target, prefix + name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


# ---- tokenizer: text (and the same bytes read as ids) ------------------------------------------
TOKENIZER = {
    "ascii": "Hello world",
    "leading-space": " leading space",
    "two-spaces": "  two  spaces",
    "chinese": "混合专家模型(MoE)的动态路由",
    "mixed": "DeepSeek-V3: 671B params, 37B active.",
    "whitespace": "tabs\tand\nnewlines\r\n\r\n  \n",
    "emoji": "emoji 🚀🔥 and accents café naïve",
    "numbers": "12345 + 67890 = 80235",
    "code": "x = torch.topk(logits, k=2)",
    "contractions": "don't won't it's I'LL WE'VE",
    "special-bytelevel": "<|endoftext|>hi<|im_start|>user<|im_end|>",
    "special-fallback": "<s> x </s><unk><0x41><0xFF>",
    "long-run": "a" * 300,
    "url": "https://example.com/path?q=1&r=2",
    "nul": "a\x00b\x00",
    "combining": "e\u0301 A\u030a \u2028\u2029\ufeff",
    "nonchar": "\U0010ffff\ufffd\uffff",
}
for name, text in TOKENIZER.items():
    write("tokenizer", name, text)
INVALID_UTF8 = {
    "invalid-lone-continuation": b"ab\x80cd",
    "invalid-overlong": b"\xc0\x80\xe0\x80\x80",
    "invalid-surrogate": b"\xed\xa0\x80\xed\xbf\xbf",
    "invalid-above-max": b"\xf4\x90\x80\x80\xf5\x80",
    "invalid-truncated": b"\xe4\xb8",
    "invalid-ff": b"\xff\xfe",
}
for name, data in INVALID_UTF8.items():
    write("tokenizer", name, data)
# As ids (u16 little-endian): byte tokens that form and break UTF-8, specials, unknown ids.
ids = lambda *v: b"".join(struct.pack("<H", x) for x in v)
write("tokenizer", "ids-bytes-e9", ids(198, 172, 198, 172, 198))       # <0xC3><0xA9><0xC3><0xA9><0xC3>
write("tokenizer", "ids-specials", ids(0, 1, 2, 300, 301, 0, 515, 65535))
write("tokenizer", "ids-range", ids(*range(250, 300)))

# ---- request: JSON bodies ----------------------------------------------------------------------
REQUEST = {
    "text": {"model": "fuzz-model", "prompt": "Hello world", "max_tokens": 8},
    "ids": {"prompt": [1, 2, 3, 4], "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 3},
    "list-ids": {"prompt": [[5, 6], [7, 8, 9]], "n": 2},
    "list-text": {"prompt": ["a", "bb", "<|endoftext|>"], "echo": True, "stop": ["b", "\n"]},
    "mixed-list": {"prompt": ["a", [1, 2]], "stop": [13, "x"], "stop_token_ids": [2, 3]},
    "stream": {"prompt": "hi", "stream": True, "stream_options": {"include_usage": False}, "logprobs": 3},
    "flags": {"prompt": [9], "skip_special_tokens": False, "ignore_eos": True, "logprobs": 0},
    "nulls": {"prompt": [9], "max_tokens": None, "n": None, "stop": None, "model": None},
    "bad-model": {"prompt": [1], "model": "other"},
    "bad-model-type": {"prompt": [1], "model": 3},
    "no-prompt": {"max_tokens": 3},
    "empty-prompt": {"prompt": []},
    "empty-text": {"prompt": ""},
    "bad-id": {"prompt": [512]},
    "negative-id": {"prompt": [-1]},
    "huge-id": {"prompt": [18446744073709551615]},
    "float-id": {"prompt": [1.5]},
    "bad-max-tokens": {"prompt": [1], "max_tokens": -1},
    "huge-max-tokens": {"prompt": [1], "max_tokens": 9223372036854775807},
    "context": {"prompt": [1] * 200, "max_tokens": 100},
    "temperature-high": {"prompt": [1], "temperature": 1e308},
    "top-p-zero": {"prompt": [1], "top_p": 0},
    "top-k-neg": {"prompt": [1], "top_k": -2},
    "n-big": {"prompt": [1], "n": 65},
    "prompts-times-n": {"prompt": [[1], [2], [3]], "n": 30},
    "echo-logprobs": {"prompt": [1], "echo": True, "logprobs": 2},
    "logprobs-big": {"prompt": [1], "logprobs": 21},
    "stop-many": {"prompt": [1], "stop": ["a"] * 17},
    "stop-empty": {"prompt": [1], "stop": [""]},
    "stop-object": {"prompt": [1], "stop": {"a": 1}},
    "stream-options-bad": {"prompt": [1], "stream_options": {"include_usage": 1}},
    "tokenize": {"model": "fuzz-model", "prompt": "Hello <|endoftext|>", "add_special_tokens": False},
    "tokenize-bad": {"prompt": 5},
    "detokenize": {"tokens": [1, 2, 3, 200, 511]},
    "detokenize-bad": {"tokens": [1, "a"]},
    "detokenize-out": {"tokens": [600]},
}
for name, body in REQUEST.items():
    write("request", name, json.dumps(body))
write("request", "not-json", "{prompt: 1")
write("request", "array", "[1,2,3]")
write("request", "nan", '{"prompt":[1],"temperature":NaN}')
write("request", "invalid-utf8", b'{"prompt":"a\xff\xfeb","stop":["\xc3"]}')
write("request", "escaped-surrogate", '{"prompt":"\\ud800\\udc00 \\udfff"}')
write("request", "deep", '{"prompt":' + "[" * 300 + "]" * 300 + "}")
write("request", "duplicate-keys", '{"prompt":[1],"prompt":"x","n":1,"n":2}')
write("request", "exponent", '{"prompt":[1e2],"max_tokens":1e1,"temperature":1e-400}')

# ---- http: byte streams a client sends ----------------------------------------------------------
def req(method, path, body="", headers=(), version="1.1", length=True):
    h = [f"{method} {path} HTTP/{version}", "Host: fuzz"]
    if length and (body or method == "POST"):
        h.append(f"Content-Length: {len(body.encode() if isinstance(body, str) else body)}")
    h += list(headers)
    head = "\r\n".join(h) + "\r\n\r\n"
    return head.encode() + (body.encode() if isinstance(body, str) else body)


def completion(**kw):
    return req("POST", "/v1/completions", json.dumps(kw), ["Content-Type: application/json"])


HTTP = {
    "healthz": req("GET", "/healthz"),
    "readyz": req("GET", "/readyz?x=1"),
    "models": req("GET", "/v1/models", headers=["Connection: close"]),
    "completion-text": completion(prompt="Hello world", max_tokens=5),
    "completion-ids": completion(prompt=[5, 6, 7], max_tokens=4, logprobs=2),
    "completion-n": completion(prompt=["ab", "cd"], n=2, echo=True, seed=1),
    "completion-stop": completion(prompt="Hello world Hello", stop=["llo", "wor"], max_tokens=6, seed=1),
    "completion-stop-ids": completion(prompt=[40, 41, 42], stop=[41], stop_token_ids=[42]),
    "stream": completion(prompt="Hello world", stream=True, max_tokens=6),
    "stream-echo-logprobs": completion(prompt=[300, 301, 302], stream=True, echo=True, n=2, seed=1),
    "stream-stop": completion(prompt="ab ab ab", stream=True, stop=["b a"], seed=1),
    "stream-no-usage": completion(prompt=[1, 2], stream=True, stream_options={"include_usage": False}),
    "refuse-all": completion(prompt=[3], max_tokens=13),
    "refuse-invalid": completion(prompt=[3], max_tokens=14, stream=True),
    "engine-error": completion(prompt=[3], max_tokens=15, n=2),
    "engine-error-stream": completion(prompt=[3], max_tokens=17, stream=True, seed=1),
    "max-tokens-zero": completion(prompt=[3], max_tokens=0),
    "bad-json": req("POST", "/v1/completions", "{"),
    "bad-field": completion(prompt=[3], temperature="hot"),
    "context": completion(prompt=[3] * 250, max_tokens=10),
    "tokenize": req("POST", "/tokenize", json.dumps({"prompt": "Hello <s> world"})),
    "detokenize": req("POST", "/detokenize", json.dumps({"tokens": [1, 198, 172, 400]})),
    "chat": req("POST", "/v1/chat/completions", json.dumps({"messages": []})),
    "metrics": req("GET", "/metrics"),
    "dashboard": req("GET", "/dashboard") + req("GET", "/dashboard/data"),
    "admin-cluster": req("GET", "/admin/cluster", headers=["Authorization: Bearer fuzz-admin-token"]),
    "admin-no-token": req("POST", "/admin/rebalance"),
    "admin-token": req("POST", "/admin/rebalance", headers=["Authorization: Bearer fuzz-admin-token"]),
    "admin-wrong-token": req("POST", "/admin/rebalance", headers=["Authorization: Bearer nope"]),
    "admin-unknown": req("GET", "/admin/nope", headers=["Authorization: Bearer fuzz-admin-token"]),
    "admin-get": req("GET", "/admin/rebalance", headers=["Authorization: Bearer fuzz-admin-token"]),
    "not-found": req("GET", "/nope/\xc3\x28"),
    "wrong-method": req("DELETE", "/v1/completions"),
    "get-completions": req("GET", "/v1/completions"),
    "http10": req("GET", "/healthz", version="1.0"),
    "http10-keepalive": req("GET", "/healthz", version="1.0", headers=["Connection: keep-alive"]),
    "pipelined": req("GET", "/healthz") + completion(prompt=[9, 10], seed=1) + req("GET", "/readyz", headers=["Connection: close"]),
    "pipelined-stream": completion(prompt=[9], stream=True) + completion(prompt=[9], stream=True, seed=1),
    "chunked": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\n{\"pro\r\n10\r\nmpt\":[1,2,3],\"max\r\nb;ext=1\r\n_tokens\":2}\r\n0\r\nTrailer: x\r\n\r\n",
    "chunked-too-large": b"POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"1000\r\n" + b"a" * 4096 + b"\r\n" + b"1001\r\n" + b"b" * 4097 + b"\r\n0\r\n\r\n",
    "body-too-large": req("POST", "/v1/completions", "x" * 9000),
    "content-length-huge": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
    "headers-too-large": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n",
    "many-headers": b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n",
    "malformed-request-line": b"GET/healthz HTTP/1.1\r\n\r\n",
    "bad-version": b"GET /healthz HTTP/2.0\r\n\r\n",
    "lf-only": b"GET /healthz HTTP/1.1\nHost: x\n\n",
    "incomplete-head": b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
    "incomplete-body": b"POST /v1/completions HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"prompt\":[1]",
    "expect-continue": req("POST", "/v1/completions", json.dumps({"prompt": [1]}), ["Expect: 100-continue"]),
    "both-lengths": b"POST /tokenize HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "invalid-utf8-body": req("POST", "/tokenize", b'{"prompt":"\xff\xfe"}'),
    "invalid-utf8-stop": req("POST", "/v1/completions", b'{"prompt":"ab\xc3","stop":["\xc3"],"stream":true}'),
    "empty": b"",
    "crlf-only": b"\r\n\r\n",
}
for name, data in HTTP.items():
    write("http", name, data)

# Inputs that reproduced bugs the HTTP fuzz target found (fixed; see docs/fuzzing.md).
HTTP_REGRESSIONS = {
    # 405 to HEAD carried its body: the next response on the connection was misread.
    "head-body": req("HEAD", "/healthz"),
    "head-then-get": req("HEAD", "/v1/models") + req("HEAD", "/nope") + req("GET", "/healthz"),
    # Refused at the 2nd choice after the 1st had already finished: the active count leaked.
    "refused-after-first-active-count": completion(prompt=[3, 4], n=3, max_tokens=12),
    # Refused mid-stream: the 1st choice's events came after [DONE].
    "refused-stream-events-after-done": completion(prompt=[3, 4], n=3, max_tokens=12, stream=True),
    # The session's 'refused' flag was never reset: later requests on the connection went unanswered.
    "refused-then-more": completion(prompt=[3, 4], n=3, max_tokens=12) + completion(prompt=[5], seed=1)
                         + completion(prompt=[6], stream=True),
    "refused-stream-then-more": completion(prompt=[3, 4], n=2, max_tokens=12, stream=True, seed=1)
                                + completion(prompt=[5], stream=True) + completion(prompt=[6]),
}
for name, data in HTTP_REGRESSIONS.items():
    write("http", name, data, prefix="regress-")

# ---- wire: headers as received, and batches / errors to round-trip --------------------------------
MAGIC, VERSION = 0x42545953, 1


def fixed(kind, dtype, batch, epoch, layer, hidden, nseg, length):
    return struct.pack("<IHBBQQIIII", MAGIC, VERSION, kind, dtype, batch, epoch, layer, hidden, nseg, length)


def batch_header(kind=1, dtype=1, hidden=4, segs=((3, 0, 1, 2),), batch=9, epoch=2, layer=1, length=None, nseg=None):
    body = b"".join(struct.pack("<IIII", *s) for s in segs)
    n = len(segs) if nseg is None else nseg
    total = 40 + len(body) if length is None else length
    return fixed(kind, dtype, batch, epoch, layer, hidden, n, total) + body


def error_frame(code=4, category=0x1234, msg=b"host: slot 3 does not hold layer 1 expert 2", reserved=0, length=None, mlen=None):
    e = struct.pack("<QBBH", category, code, reserved, len(msg) if mlen is None else mlen) + msg
    return fixed(3, 0, 5, 6, 7, 0, 0, 40 + len(e) if length is None else length) + e


D = lambda b: b"\x00" + b  # decode with the declared payload length
L = lambda n, b: b"\x01" + struct.pack("<Q", n) + b  # decode with payload length n, tight limits
WIRE = {
    "request": D(batch_header()),
    "reply-f32": D(batch_header(kind=2, dtype=2, hidden=8, segs=((1, 2, 3, 1), (4, 5, 6, 3)))),
    "error-frame": D(error_frame()),
    "error-frame-code0": D(error_frame(code=0)),
    "error-frame-reserved": D(error_frame(reserved=7)),
    "error-frame-utf8": D(error_frame(msg="ошибка 错误".encode())),
    "truncated": D(batch_header()[:30]),
    "truncated-declared": D(batch_header(length=200)),
    "bad-magic": D(b"XXXX" + batch_header()[4:]),
    "bad-version": D(batch_header()[:4] + b"\x02\x00" + batch_header()[6:]),
    "bad-kind": D(batch_header(kind=4)),
    "bad-dtype": D(batch_header(dtype=3)),
    "length-mismatch": L(10, batch_header()),
    "segments-disagree": D(batch_header(nseg=2)),
    "too-many-segments": L(8, batch_header(segs=tuple((i, i, 0, 1) for i in range(5)), hidden=1)),
    "no-segments": D(batch_header(segs=())),
    "hidden-zero": D(batch_header(hidden=0)),
    "hidden-big": L(0, batch_header(hidden=65)),
    "rows-zero": D(batch_header(segs=((1, 1, 1, 0),))),
    "rows-overflow": D(batch_header(hidden=65536, segs=((1, 1, 1, 0xFFFFFFFF),) * 2)),
    "too-large": L(1 << 40, batch_header(hidden=65536, segs=((1, 1, 1, 0xFFFF),))),
    "error-with-dtype": D(fixed(3, 1, 0, 0, 0, 0, 0, 52) + b"\x00" * 12),
    "error-with-segments": D(fixed(3, 0, 0, 0, 0, 0, 1, 52) + b"\x00" * 12),
    "error-with-payload": L(16, error_frame()),
    "error-short": D(fixed(3, 0, 0, 0, 0, 0, 0, 44) + b"\x00" * 4),
    "error-long-message": D(error_frame(msg=b"m" * 1025)),
    "error-message-length": D(error_frame(mlen=3)),
    "round-trip-bf16": b"\x02" + bytes([0x06]) + bytes(range(1, 40)) + b"\x7f\xc0\xff\xff\x80\x7f\x00\x00",
    "round-trip-f32-reply": b"\x02" + bytes([0x15]) + bytes(range(40, 120)) + b"\x00\x00\xc0\x7f\x01\x00\x80\x7f",
    "round-trip-error": b"\x03" + bytes([9]) + b"\x01" * 20 + "message é".encode(),
}
for name, data in WIRE.items():
    write("wire", name, data)

# Inputs that reproduced bugs the wire fuzz target found (fixed; see docs/fuzzing.md).
WIRE_REGRESSIONS = {
    # encode_error of an empty caf::error dereferenced null (CAF's category()).
    "encode-empty-error": b"\x03\x00" + b"\x03" * 20 + b"x",
    # A message over 1024 bytes was cut inside a UTF-8 character.
    "error-message-cut-utf8": b"\x03" + bytes([9]) + b"\x02" * 20 + b"x" + "é".encode() * 600,
}
for name, data in WIRE_REGRESSIONS.items():
    write("wire", name, data, prefix="regress-")

print("seeds written under", CORPUS)
