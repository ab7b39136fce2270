"""bigmodel serve: a real uvicorn server in its own process, spoken to by the official OpenAI client and by
plain HTTP; its answers are compared with `bigmodel infer` on the same inputs."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path

import openai
import pytest

from tests.conftest import cli
from tests.test_deploy_lm import lm_run, onnx_of  # noqa: F401 - the module's trained, exported tiny GPT


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def server(*args: object, env: dict[str, str] | None = None) -> Iterator[str]:
    """`bigmodel serve ...` on a free port; yields its base URL once /health answers; stops it with SIGTERM."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bigmodel", "serve", *map(str, args), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base)
        yield base
    finally:
        proc.terminate()  # SIGTERM: drain and exit 0
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr


def wait_healthy(proc: subprocess.Popen, base: str) -> None:
    """Until the server's /health answers 200 (a server that exits first fails the test with its stderr)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
                return
        time.sleep(0.1)


def http(base: str, path: str, body: object = None, headers: dict[str, str] | None = None) -> tuple[int, dict | str]:
    data = body.encode() if isinstance(body, str) else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"{base}{path}", data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def greedy_infer(model: Path, prompt: str, tokens: int, tmp: Path) -> str:
    out = tmp / "infer.jsonl"
    result = cli("infer", "-m", model, "-p", prompt, "-n", str(tokens), "-t", "0", "-o", out, "-q")
    assert result.code == 0, result.stderr
    return json.loads(out.read_text())["completion"]


def test_the_openai_client_completes_and_streams_like_infer(lm_run: Path, tmp_path: Path) -> None:  # noqa: F811
    expected = greedy_infer(onnx_of(lm_run), "def ", 24, tmp_path)
    with server("--model", onnx_of(lm_run)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["run"]
        whole = client.completions.create(model="run", prompt="def ", max_tokens=24, temperature=0)
        assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
        assert whole.usage.prompt_tokens == 4 and whole.usage.completion_tokens == 24
        pieces = list(client.completions.create(model="run", prompt="def ", max_tokens=24, temperature=0, stream=True))
        assert "".join(p.choices[0].text for p in pieces if p.choices) == expected
        # The opening chunk, text, the closing chunk; text decoded faster than the event loop sends it
        # goes out together, so the number of text chunks depends on the machine's load.
        assert pieces[-1].choices[0].finish_reason == "length" and len(pieces) >= 3
        stopped = client.completions.create(
            model="run", prompt="def ", max_tokens=24, temperature=0, stop=[expected[5:7]]
        )
        assert stopped.choices[0].finish_reason == "stop" and expected.startswith(stopped.choices[0].text)
        seeded = [
            client.completions.create(model="run", prompt="def ", max_tokens=12, seed=7).choices[0].text
            for _ in range(2)
        ]
        assert seeded[0] == seeded[1]
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.completions.create(model="run", prompt="def ", max_tokens=0)
        with pytest.raises(openai.BadRequestError, match="context is 32"):
            client.completions.create(model="run", prompt="x = 1\n" * 8, max_tokens=4)
        metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
        assert 'bigmodel_requests_total{path="/v1/completions",status="200"} 5' in metrics
        assert 'bigmodel_requests_total{path="/v1/completions",status="400"} 2' in metrics
        generated = 24 + 24 + stopped.usage.completion_tokens + 12 + 12
        assert f'bigmodel_tokens_total{{kind="completion"}} {generated}' in metrics


def test_bad_requests_get_openai_style_errors_never_a_500(lm_run: Path) -> None:  # noqa: F811
    with server("--model", onnx_of(lm_run), "--api-key", "s3cret", "--set", "serve.context_shift=true") as base:
        auth = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
        cases = [
            ("not json", "the body is not valid JSON", None),
            ([1, 2], "JSON object", None),
            ({"prompt": "def ", "bogus": 1}, "bogus: unknown field", "bogus"),
            ({"prompt": 5}, "prompt", "prompt"),
            ({"prompt": "def ", "temperature": -1}, "temperature", "temperature"),
            ({"prompt": "def ", "n": 0}, "n", "n"),
            ({"prompt": "def ", "logprobs": 21}, "logprobs", "logprobs"),
            ({"prompt": [[1, 2], [3, 99999]]}, "prompt.1.1: 99999 is not a token id", "prompt"),
            ({"prompt": []}, "give a prompt", "prompt"),
            ({"prompt": [[]]}, "prompt: empty", "prompt"),
            ({"prompt": "def ", "max_tokens": 0}, "with echo", "max_tokens"),
            ({"prompt": ["def "] * 3, "n": 50}, "at most 128", "prompt"),
            ({"messages": [{"role": "user", "content": "hi"}], "echo": True}, "does not echo", "echo"),
            ({"prompt": "\u65e5\u672c"}, "vocabulary", None),
            ({"messages": [{"role": "user", "content": "hi"}]}, "no chat template", "messages"),
        ]
        for body, fragment, param in cases:
            path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
            status, answer = http(base, path, body, auth)
            assert status == 400 and fragment in answer["error"]["message"], (body, answer)
            assert answer["error"]["type"] == "invalid_request_error" and (
                param is None or answer["error"]["param"] == param
            )
        status, answer = http(base, "/v1/completions", {"prompt": "def "})
        assert status == 401 and answer["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong").models.list()
        assert http(base, "/v1/nope", None, auth)[0] == 404
        assert http(base, "/health")[0] == 200  # health and metrics need no key
        # A client that leaves mid-stream frees the model: 100,000 tokens would take minutes.
        connection = HTTPConnection(base.removeprefix("http://"), timeout=30)
        connection.request(
            "POST", "/v1/completions", json.dumps({"prompt": "def ", "max_tokens": 100_000, "stream": True}), auth
        )
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        connection.close()
        started = time.perf_counter()
        status, answer = http(base, "/v1/completions", {"prompt": "def ", "max_tokens": 3}, auth)
        assert status == 200 and time.perf_counter() - started < 20


def test_logprobs_echo_batches_and_n_speak_what_evaluation_clients_send(lm_run: Path) -> None:  # noqa: F811
    """lm-evaluation-harness's loglikelihood request (token-id prompts in a batch, echo, max_tokens 0,
    logprobs 1) scores each prompt token as ONNX Runtime's own logits do; greedy tokens are the top of
    their logprobs; n samples are seeds seed..seed+n-1; streamed logprobs equal the whole answer's."""
    import numpy as np
    import onnxruntime as ort

    from bigmodel import decoder_graph
    from bigmodel.decoder_graph import CacheLayout
    from bigmodel.infer.session import file_metadata

    model = onnx_of(lm_run)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    meta = file_metadata(model)

    def expected_logprobs(ids: list[int]) -> np.ndarray:  # each token after the first, from the graph itself
        cache = CacheLayout.from_metadata(meta).empty(1)
        logits = session.run(None, decoder_graph.feeds(np.array([ids]), cache))[0][0].astype(np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        return np.array([log_probs[t, ids[t + 1]] for t in range(len(ids) - 1)])

    with server("--model", model) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        prompts = [[5, 17, 23, 4, 9], [40, 2, 2]]
        scored = client.completions.create(
            model="run", prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0
        )
        assert [c.index for c in scored.choices] == [0, 1]
        status, tokenized = http(base, "/detokenize", {"tokens": prompts[0]})
        assert status == 200
        assert scored.choices[0].text == tokenized["prompt"] and scored.choices[0].finish_reason == "length"
        for choice, ids in zip(scored.choices, prompts):
            logprobs = choice.logprobs
            assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
            assert len(logprobs.tokens) == len(ids) and logprobs.text_offset[0] == 0
            np.testing.assert_allclose(logprobs.token_logprobs[1:], expected_logprobs(ids), atol=1e-5)
            for token, value, top in zip(logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:]):
                assert top[token] == value and 1 <= len(top) <= 2  # the best one, and the chosen
        assert scored.usage.prompt_tokens == 8 and scored.usage.completion_tokens == 0

        greedy = client.completions.create(model="run", prompt="def ", max_tokens=6, logprobs=3, temperature=0)
        choice = greedy.choices[0]
        assert "".join(choice.logprobs.tokens) == choice.text and len(choice.logprobs.tokens) == 6
        for value, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
            assert value == max(top.values()) and len(top) == 3  # greedy: the chosen token is the likeliest
        offsets = choice.logprobs.text_offset
        assert offsets == [sum(len(t) for t in choice.logprobs.tokens[:i]) for i in range(6)]
        pieces = list(
            client.completions.create(model="run", prompt="def ", max_tokens=6, logprobs=3, temperature=0, stream=True)
        )
        streamed = [
            v for p in pieces if p.choices and p.choices[0].logprobs for v in p.choices[0].logprobs.token_logprobs
        ]
        assert streamed == choice.logprobs.token_logprobs

        samples = client.completions.create(model="run", prompt="def ", max_tokens=8, n=3, seed=7)
        alone = [
            client.completions.create(model="run", prompt="def ", max_tokens=8, seed=7 + j).choices[0].text
            for j in range(3)
        ]
        assert [c.text for c in samples.choices] == alone and len(set(alone)) > 1
        assert samples.usage.prompt_tokens == 4 and samples.usage.completion_tokens == 24


def test_tokenize_and_detokenize_answer_in_vllms_shapes(lm_run: Path) -> None:  # noqa: F811
    """/tokenize gives the ids a completion of the prompt starts from (its usage counts them), /detokenize
    turns them back into the text; ids outside the vocabulary and malformed bodies are 400s naming the field."""
    with server("--model", onnx_of(lm_run)) as base:
        status, tokenized = http(base, "/tokenize", {"prompt": "def hello"})
        assert status == 200 and tokenized["count"] == len(tokenized["tokens"]) > 0
        status, completed = http(base, "/v1/completions", {"prompt": "def hello", "max_tokens": 1})
        assert status == 200 and completed["usage"]["prompt_tokens"] == tokenized["count"]
        assert tokenized["max_model_len"] >= tokenized["count"]
        assert http(base, "/detokenize", {"tokens": tokenized["tokens"]}) == (200, {"prompt": "def hello"})
        cases = [
            ("/detokenize", {"tokens": [tokenized["tokens"][0], 10**6]}, "tokens", "tokens.1: 1000000"),
            ("/detokenize", {"tokens": ["a"]}, "tokens", "tokens"),
            ("/tokenize", {}, "prompt", "a prompt or messages"),
            ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt", "one of"),
            ("/tokenize", {"prompt": "x", "add_special_tokens": False}, "add_special_tokens", "unknown field"),
            ("/tokenize", {"messages": [{"role": "user", "content": "x"}]}, "messages", "no chat template"),
        ]
        for path, body, param, fragment in cases:
            status, answer = http(base, path, body)
            assert status == 400 and answer["error"]["param"] == param and fragment in answer["error"]["message"], (
                body,
                answer,
            )


def test_max_batch_and_max_queue_bound_the_work_and_a_full_queue_answers_503(lm_run: Path) -> None:  # noqa: F811
    with server(
        "--model", onnx_of(lm_run), "--max-batch", "1", "--max-queue", "1", "--set", "serve.context_shift=true"
    ) as base:

        def open_stream() -> HTTPConnection:
            connection = HTTPConnection(base.removeprefix("http://"), timeout=30)
            connection.request(
                "POST",
                "/v1/completions",
                json.dumps({"prompt": "def ", "max_tokens": 100_000, "stream": True}),
                {"Content-Type": "application/json"},
            )
            return connection

        decoding = open_stream()
        assert decoding.getresponse().readline().startswith(b"data: ")  # it has the one row
        waiting = open_stream()  # answered 200 with its opening chunk, then waits for the row
        deadline = time.time() + 10
        while "bigmodel_queue_depth 1" not in urllib.request.urlopen(f"{base}/metrics").read().decode():
            assert time.time() < deadline
            time.sleep(0.05)
        metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
        assert "bigmodel_batch_rows 1" in metrics
        started = time.perf_counter()
        status, answer = http(base, "/v1/completions", {"prompt": "def ", "max_tokens": 2})
        assert status == 503 and answer["error"]["type"] == "server_busy" and time.perf_counter() - started < 5
        decoding.close()
        waiting.close()


def test_tabular_predictions_are_infers(digits_run: Path, tmp_path: Path) -> None:
    run_dir = digits_run.parent / "run"
    header, *lines = (run_dir / "prepare" / "test.csv").read_text().splitlines()[:6]
    columns = header.split(",")
    rows = [{c: float(v) if c != "label" else v for c, v in zip(columns, line.split(","))} for line in lines]
    expected = tmp_path / "expected.jsonl"
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli("infer", "-m", run_dir / "export" / "model.onnx", "-i", source, "-o", expected, "-q").code == 0
    with server("-c", digits_run) as base:
        status, answer = http(base, "/v1/predict", {"rows": rows})
        assert status == 200, answer
        assert answer["predictions"] == [json.loads(line) for line in expected.read_text().splitlines()]
        del rows[1][columns[3]]
        status, answer = http(base, "/v1/predict", {"rows": rows})
        assert status == 400 and columns[3] in answer["error"]["message"]


def test_the_server_never_imports_torch(lm_run: Path) -> None:  # noqa: F811
    script = (
        "import sys\nfrom pathlib import Path\nfrom bigmodel.config import ServeConfig\nfrom bigmodel import serve\n"
        "serve.build(Path(sys.argv[1]), ServeConfig(), ['CPUExecutionProvider'], 1)\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(onnx_of(lm_run))], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


def test_a_full_queue_answers_503_at_once_and_the_model_takes_turns() -> None:
    import asyncio

    from bigmodel.serve.app import Queue, RequestError

    async def scenario() -> list[str]:
        queue, order = Queue(limit=1), []

        async def request(name: str, hold: float) -> None:
            queue.check_room()
            async with queue.turn():
                order.append(f"{name} starts")
                await asyncio.sleep(hold)
                order.append(f"{name} ends")

        first = asyncio.create_task(request("a", 0.2))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(request("b", 0.0))  # waits for a: the one place in the queue
        await asyncio.sleep(0.05)
        with pytest.raises(RequestError) as refused:
            queue.check_room()
        assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
        await asyncio.gather(first, second)
        queue.check_room()  # room again once they are done
        return order

    assert asyncio.run(scenario()) == ["a starts", "a ends", "b starts", "b ends"]


def test_requests_decoded_together_get_what_each_would_get_alone(lm_run: Path) -> None:  # noqa: F811
    """The scheduler with rows of different prompt lengths, sampling settings and lengths of output (past the
    32-token context: the window re-read), one row cancelled midway: each finished row equals infer alone."""
    import threading

    from bigmodel.config import InferConfig
    from bigmodel.infer.gpt import Decoder, Generation, complete
    from bigmodel.infer.session import open_model
    from bigmodel.serve.batching import Request, Scheduler

    session, meta = open_model(onnx_of(lm_run), ["CPUExecutionProvider"], 1)
    decoder = Decoder.from_session(session, meta, onnx_of(lm_run))
    cases = [
        ("def ", InferConfig(max_new_tokens=40, temperature=0)),
        ("x = 1\nfor i in range(3):\n", InferConfig(max_new_tokens=12, temperature=0)),
        ("import ", InferConfig(max_new_tokens=20, temperature=0.8, top_k=5)),
        ("class A:\n    ", InferConfig(max_new_tokens=16, temperature=1.0, top_p=0.9, stop=["\n"])),
        ("a", InferConfig(max_new_tokens=200, temperature=0)),
    ]  # cancelled below
    expected = [complete(decoder, prompt, settings, seed=3) for prompt, settings in cases[:-1]]
    scheduler = Scheduler(decoder, max_batch=8)
    outcomes: dict[int, object] = {}
    texts: dict[int, list[str]] = {i: [] for i in range(len(cases))}
    done = threading.Event()

    def ended(index: int):
        def on_end(outcome: object) -> None:
            outcomes[index] = outcome
            if len(outcomes) == len(cases) - 1:
                done.set()

        return on_end

    rows = [
        Request(Generation(decoder, prompt, settings, 3), texts[i].append, ended(i))
        for i, (prompt, settings) in enumerate(cases)
    ]
    for row in rows:
        scheduler.submit(row)
    while sum(map(len, texts.values())) < 10:
        time.sleep(0.001)
    rows[-1].cancelled.set()
    assert done.wait(60)
    scheduler.stop()
    assert scheduler.largest_batch == len(cases)  # they were decoded together, not one after another
    assert [outcomes[i] for i in range(len(expected))] == expected
    assert ["".join(texts[i]) for i in range(len(expected))] == [e["completion"] for e in expected]
    assert len(cases) - 1 not in outcomes  # the cancelled row never finished, and the others were not held up


def test_a_request_must_fit_the_context_and_bodies_are_bounded(lm_run: Path) -> None:  # noqa: F811
    """32-token context: max_tokens past it is a 400 saying how many fit; without max_tokens the default is
    capped to what fits; a body over serve.max_body_bytes is a 413 before it is read; a prompt far too long
    for the context is refused without tokenising it; GET /v1/models/{id}; CORS for the origins given."""
    with server(
        "--model",
        onnx_of(lm_run),
        "--set",
        "serve.max_body_bytes=2000",
        "--set",
        'serve.cors_origins=["https://app.example"]',
    ) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        with pytest.raises(openai.BadRequestError, match="the prompt takes 4, leaving 28: ask for at most 28"):
            client.completions.create(model="run", prompt="def ", max_tokens=29)
        capped = client.completions.create(model="run", prompt="def ", temperature=0, stop=["never"])
        assert capped.usage.completion_tokens == 28 and capped.choices[0].finish_reason == "length"
        assert client.models.retrieve("run").id == "run"
        with pytest.raises(openai.NotFoundError, match="this server serves 'run'"):
            client.models.retrieve("gpt-4")
        started = time.perf_counter()
        status, answer = http(base, "/v1/completions", {"prompt": "x" * 5000})
        assert status == 413 and "serve.max_body_bytes" in answer["error"]["message"]
        assert time.perf_counter() - started < 5
        status, answer = http(
            base, "/v1/completions", {"prompt": "x" * 1900}
        )  # 1,900 characters > 2 x 32 x longest token
        assert status == 400 and "more than the model's context of 32 tokens can hold" in answer["error"]["message"]
        preflight = urllib.request.Request(
            f"{base}/v1/chat/completions",
            method="OPTIONS",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        with urllib.request.urlopen(preflight) as response:
            assert response.status == 200
            assert response.headers["access-control-allow-origin"] == "https://app.example"
        elsewhere = urllib.request.Request(f"{base}/v1/models", headers={"Origin": "https://evil.example"})
        with urllib.request.urlopen(elsewhere) as response:
            assert "access-control-allow-origin" not in response.headers


def test_a_client_that_hangs_up_is_dropped_and_sigterm_drains_then_cuts_and_exits_0(lm_run: Path) -> None:  # noqa: F811
    """A non-streamed request whose client disconnects leaves the batch (499 in /metrics); on SIGTERM the
    requests still running after serve.drain_seconds are cut -- a stream ends with an error event and
    [DONE], a waiting request gets a 503 -- and the process exits 0 saying how many were cut."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bigmodel",
            "serve",
            "--model",
            str(onnx_of(lm_run)),
            "--port",
            str(port),
            "--set",
            "serve.context_shift=true",
            "--set",
            "serve.drain_seconds=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base, host = f"http://127.0.0.1:{port}", f"127.0.0.1:{port}"
    try:
        wait_healthy(proc, base)

        def rows() -> str:
            return next(
                line
                for line in urllib.request.urlopen(f"{base}/metrics").read().decode().splitlines()
                if line.startswith("bigmodel_batch_rows ")
            )

        def send(stream: bool) -> HTTPConnection:
            connection = HTTPConnection(host, timeout=30)
            connection.request(
                "POST",
                "/v1/completions",
                json.dumps({"prompt": "def ", "max_tokens": 100_000, "stream": stream}),
                {"Content-Type": "application/json"},
            )
            return connection

        hung_up = send(stream=False)
        deadline = time.time() + 10
        while rows() != "bigmodel_batch_rows 1":
            assert time.time() < deadline
            time.sleep(0.05)
        hung_up.close()
        while rows() != "bigmodel_batch_rows 0":
            assert time.time() < deadline, "the row of a client that hung up is still decoding"
            time.sleep(0.05)
        assert 'path="/v1/completions",status="499"} 1' in urllib.request.urlopen(f"{base}/metrics").read().decode()

        streaming, waiting = send(stream=True), send(stream=False)
        stream = streaming.getresponse()
        assert stream.readline().startswith(b"data: ")
        while rows() != "bigmodel_batch_rows 2":
            time.sleep(0.05)
        proc.terminate()
        rest = stream.read().decode()
        answer = waiting.getresponse()
        assert answer.status == 503 and "drain time ran out" in json.loads(answer.read())["error"]["message"]
        assert '"type": "server_error"' in rest and "drain time ran out" in rest and rest.endswith("data: [DONE]\n\n")
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "2 request(s) still running after the 1 s drain were cut" in stderr and "Traceback" not in stderr
