"""Whole runs of the console script: the same seed twice gives the same metrics; an unreachable W&B server
costs nothing but a fallback to offline logging; a run killed while judging asks the judge again only for
the items whose answers it had not stored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import compose_config

from deepalign.config import validate
from deepalign.storage.jsonl import JsonlStore

CHATS = [
    {"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."}
    for i in range(8)
]
EVAL_ROWS = [
    {"prompt": f"Please answer request {i}.", "harmful": "Sure, here is the answer, step by step, in full."}
    for i in range(3)
]


def start(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """The console script in a child process, its output in a file; one torch thread (two stall on a
    shared, busy machine)."""
    cmd = [str(Path(sys.executable).parent / "deepalign"), *args]
    full_env = {**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("WANDB_MODE", None)
    log = cwd / f"console-{len(list(cwd.glob('console-*')))}.txt"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def finish(started: tuple[subprocess.Popen, Path], timeout: float = 300) -> None:
    proc, log = started
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    chats, eval_file = folder / "chats.jsonl", folder / "eval.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in EVAL_ROWS))
    return {"chats": chats, "eval": eval_file}


def train_and_attack(inputs: dict[str, Path], run_dir: Path, cache: Path, *extra: str) -> list[str]:
    """A short constrained fine-tune then sampled and prefilled attacks; each run gets its own cold
    reference cache (the converted tokenizer is shared)."""
    models = Path(validate(compose_config(["model=tiny"])).model.cache_dir).expanduser()
    return [
        "model=tiny",
        "logger=none",
        "stages=[train,attack]",
        "data=chat_file",
        f"data.components.chat.source={inputs['chats']}",
        "data.max_length=64",
        "loss=constrained",
        "train.max_steps=3",
        "train.per_device_batch_size=2",
        "train.optimizer.lr=1e-3",
        f"eval.prompts={inputs['eval']}",
        "attack=[none,prefill,decoding]",
        "attack.prefill.depths=[3]",
        "attack.decoding.greedy=false",
        "attack.decoding.temperatures=[0.8]",
        "attack.decoding.top_ks=[20]",
        "attack.decoding.top_ps=[0.9]",
        "generation.max_new_tokens=8",
        "seed=7",
        f"paths.cache_dir={cache}",
        f"model.cache_dir={models}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def test_the_same_seed_twice_gives_identical_metrics_and_generations(inputs, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]  # two processes at once (and two Python hash seeds)
    procs = [start(*train_and_attack(inputs, r, tmp_path / f"cache-{r.name}"), cwd=tmp_path) for r in runs]
    for proc in procs:
        finish(proc)
    a, b = (json.loads((r / "metrics.json").read_text()) for r in runs)
    measured = ("time/", "throughput/", "memory/")  # of the machine, not of the result
    a, b = ({k: v for k, v in m.items() if not k.startswith(measured)} for m in (a, b))
    assert a == b
    assert a["train/steps"] == 3 and a["train/reference_cache_hit"] == 0
    assert {"asr/none", "asr/prefill/k=3", "asr/decoding/temperature=0.8"} <= set(a)
    for attack in ("none", "prefill", "decoding"):
        first, second = (
            {k: g["response"] for k, g in JsonlStore(r / "generations" / f"{attack}.jsonl").records.items()}
            for r in runs
        )
        assert first and first == second, f"{attack}: the generations differ"
    weights = [(r / "model" / "model.safetensors").read_bytes() for r in runs]
    assert weights[0] == weights[1]


def test_unreachable_wandb_server_falls_back_to_offline_and_the_run_finishes(inputs, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "model=tiny",
        "logger=wandb",
        "logger.mode=online",
        "stages=[train]",
        "data=chat_file",
        f"data.components.chat.source={inputs['chats']}",
        "data.max_length=64",
        "train.max_steps=2",
        "train.per_device_batch_size=2",
        f"hydra.run.dir={run_dir}",
    ]
    env = {
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # the discard port: nothing listens
        "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",  # well-formed, fake
        "WANDB_INIT_TIMEOUT": "5",
    }
    finish(start(*args, cwd=tmp_path, env=env), timeout=240)
    log = (run_dir / "deepalign.log").read_text()
    assert "W&B online init failed" in log and "logging offline instead" in log
    assert json.loads((run_dir / "metrics.json").read_text())["train/steps"] == 2
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and any(offline[0].rglob("*.wandb"))


class SlowJudgeAPI:
    """An OpenAI-compatible chat-completions endpoint on 127.0.0.1 that answers every request with the rubric
    score 1 after `delay` seconds and keeps the request texts."""

    def __init__(self, delay: float):
        self.requests: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.requests.append(body["messages"][0]["content"])
                time.sleep(delay)
                reply = {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "#thereason: none\n#thescore: 1"},
                            "finish_reason": "stop",
                        }
                    ],
                }
                data = json.dumps(reply).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client was killed
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def test_sigkill_during_judging_then_rerun_asks_only_for_the_unstored_judgments(tmp_path):
    """A real kill while the rubric judge waits on the API: the rerun generates nothing and requests exactly
    the items whose replies were not in the judge's cache yet."""
    api = SlowJudgeAPI(delay=0.3)
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(
        "".join(json.dumps({"prompt": f"Please answer request {i}."}) + "\n" for i in range(12))
    )
    cache = tmp_path / "cache"
    args = [
        "model=tiny",
        "+model.arch.initializer_range=0.3",  # answers with text (the default init writes blank lines)
        "logger=none",
        "stages=[attack]",
        f"eval.prompts={eval_file}",
        "attack=[none]",
        "judge=[rubric]",
        f"judge.rubric.base_url={api.base_url}",
        "judge.rubric.concurrency=1",
        "generation.max_new_tokens=4",
        f"paths.cache_dir={cache}",
        f"model.cache_dir={Path(validate(compose_config(['model=tiny'])).model.cache_dir).expanduser()}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {"OPENAI_API_KEY": "sk-fakeKeyForTheLocalServer0123456789"}
    proc, _ = start(*args, cwd=tmp_path, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(api.requests) < 4:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored = len(list((cache / "judge" / "rubric").glob("*.json")))  # replies the killed run had kept
    first = len(api.requests)
    assert 3 <= stored <= first < 12
    rerun = start(*args, cwd=tmp_path, env=env)
    finish(rerun)
    second = api.requests[first:]
    assert len(second) == 12 - stored and len(set(second)) == len(second)
    assert "none: 12 of 12 generations already done, 0 to generate" in rerun[1].read_text()
    judgments = JsonlStore(tmp_path / "run" / "judgments" / "none.rubric.jsonl").records
    assert len(judgments) == 12 and all(j["score"] == 1 for j in judgments.values())
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["asr/none"] == 0.0
