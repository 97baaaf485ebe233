"""Continuous batching for the `hf` rollout server: concurrent requests decode together, one token at a time.

`BatchScheduler.generate` is what the server awaits per request; one scheduler loop serves all of them. Each tick:
1. admit: every waiting request (up to `max_batch` running) is prefilled alone (`HFGenerator.prefill`, no
   padding), and its first token sampled; unless that already finished it, its KV cache joins the batch's. All rows
   share one column axis, right-aligned: a shorter row is left-padded with zero keys and values that its
   attention-mask row hides. Prefill computes only what `PrefixStore` does not hold: the KV cache of the longest
   prefix the prompt shares with a recent prompt or prompt + answer (the episodes of one GRPO group share their
   recognize prompt; a respond prompt extends its episode's recognize prompt and answer; a judge prompt shares
   the system prompt and the dialogue), as vLLM's prefix caching does;
2. decode: one forward of every row's last token, with the row's own position id (its count of real tokens, so
   padding never shifts a position) and the [B, T+1] attention mask; each row then takes its next token from its
   own logits with its own sampling, generator and stop conditions (`HFGenerator.advance`, as one at a time);
3. retire: finished rows leave the batch (their prompt + answer KV goes to the prefix store) and their callers get
   their `Generation` at once; columns that only padding still occupies are cut.
A request that arrives during a tick joins at the next one (no waiting window). Greedy outputs equal one-at-a-time
decoding up to float rounding of batched and chunked matmuls (tests compare token ids exactly and log-probs to
1e-4). The prefix store must be cleared when the weights change (the server does it on every weight sync).

Full-attention decoder models only (Llama, Qwen2/3: `DynamicCache` layers without a sliding window). No verl, no
Ray: the server (`selfemo_verl.cpu.hf_rollout`) owns one scheduler; tests drive it directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from selfemo_verl.cpu.hf_generate import Decoding, Generation, HFGenerator, Sampling

logger = logging.getLogger(__name__)
PREFIX_CACHE_BYTES = 1 << 30  # KV caches kept for prefix reuse (SmolLM2-135M fp32: 46 KB per token, ~23k tokens)
PREFIX_CACHE_ENTRIES = 512  # and at most this many sequences (a lookup compares the prompt with each)


@dataclass(eq=False)
class Row:
    """A request in the scheduler: its decoding state, tokens in its KV cache, and the caller's future."""

    decoding: Decoding
    prompt_ids: list[int]
    future: asyncio.Future | None = None
    length: int = 0  # real tokens in its KV cache = the position id of the token it feeds next


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer, each [B, heads, T, head_dim]; refuses sliding-window layers."""
    if any(cache.is_sliding):
        raise NotImplementedError("the batched hf rollout supports full-attention models only (no sliding window)")
    return [(keys, values) for keys, values, *_ in cache]


def left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """Pad dimension -2 (tokens) of [B, H, T, D] with n zero columns on the left.

    >>> left_pad(torch.ones(1, 1, 2, 1), 1)[0, 0, :, 0].tolist()
    [0.0, 1.0, 1.0]
    """
    return F.pad(t, (0, 0, n, 0)) if n else t


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-d token tensors.

    >>> common_prefix(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 9]))
    2
    """
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


class PrefixStore:
    """KV caches of recent token sequences, so a prompt is prefilled only past its longest stored prefix.

    Least recently used entries go first once they hold more than `max_bytes` or number more than
    `PREFIX_CACHE_ENTRIES`; an entry that is a prefix of a new one is replaced by it. A prompt reuses at most all but
    its last token (whose logits the prefill computes).
    """

    def __init__(self, max_bytes: int = PREFIX_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, tuple[torch.Tensor, list, int]] = OrderedDict()  # tokens, layers, bytes
        self.bytes = 0
        self.reused_tokens = 0

    def lookup(self, prompt: list[int]) -> tuple[int, list | None]:
        """(n, KV layers of prompt[:n]) for the longest stored prefix, n <= len(prompt) - 1; (0, None) if none."""
        query = torch.tensor(prompt[:-1], dtype=torch.long)
        best, key = 0, None
        for k, (tokens, _, _) in self.entries.items():
            n = common_prefix(tokens, query)
            if n > best:
                best, key = n, k
        if key is None:
            return 0, None
        self.entries.move_to_end(key)
        self.reused_tokens += best
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self.entries[key][1]]

    def add(self, tokens: list[int], layers: list) -> None:
        """Keep `layers` (batch 1, one column per token) as the KV cache of `tokens`."""
        size = sum(k.nbytes + v.nbytes for k, v in layers)
        if size > self.max_bytes:
            return
        key = tuple(tokens)
        for old in [k for k in self.entries if key[: len(k)] == k]:
            self.bytes -= self.entries.pop(old)[2]
        self.entries[key] = (torch.tensor(tokens, dtype=torch.long), layers, size)
        self.bytes += size
        while self.bytes > self.max_bytes or len(self.entries) > PREFIX_CACHE_ENTRIES:
            self.bytes -= self.entries.popitem(last=False)[1][2]

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0


class DecodeBatch:
    """Rows decoding together over one left-padded KV cache (plain torch; `BatchScheduler` drives it)."""

    def __init__(self, engine: HFGenerator, prefix_cache_bytes: int = PREFIX_CACHE_BYTES):
        self.engine = engine
        self.store = PrefixStore(prefix_cache_bytes)
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # [B, T]: 1 on real tokens, 0 on padding

    def admit(self, rows: list[Row]) -> tuple[list[Row], list[tuple[Row, Exception]]]:
        """Prefill each row alone and sample its first token; join the unfinished ones. -> (finished, failed)."""
        finished, failed, joining = [], [], []
        for row in rows:
            try:
                logits, layers = self._prefill(row.prompt_ids)
            except Exception as exc:  # a bad prompt (e.g. an id outside the vocabulary) fails its own caller only
                failed.append((row, exc))
                continue
            row.length = len(row.prompt_ids)
            if self.engine.advance(row.decoding, logits):
                finished.append(row)
            else:
                joining.append((row, layers))
        if joining:
            self._join(joining)
        return finished, failed

    def _prefill(self, prompt: list[int]) -> tuple[torch.Tensor, list]:
        """Last-position logits and the KV layers of `prompt`, computing only what the prefix store lacks."""
        n, past = self.store.lookup(prompt)
        logits, cache = self.engine.prefill(prompt[n:], None if past is None else DynamicCache(past))
        layers = cache_layers(cache)
        self.store.add(prompt, layers)
        return logits, layers

    def _join(self, joining: list[tuple[Row, list]]) -> None:
        """Append rows (with their prompt caches) to the batch, right-aligned on max(T, longest prompt) columns."""
        width = max([self.mask.shape[1]] + [row.length for row, _ in joining])
        parts = [(self._layers(), self.mask)] if self.rows else []
        parts += [(layers, torch.ones(1, row.length, dtype=torch.long)) for row, layers in joining]
        per_layer = zip(*[[(left_pad(k, width - m.shape[1]), left_pad(v, width - m.shape[1])) for k, v in layers]
                          for layers, m in parts])
        self.cache = DynamicCache([(torch.cat([k for k, _ in kv]), torch.cat([v for _, v in kv])) for kv in per_layer])
        self.mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for _, m in parts])
        self.rows += [row for row, _ in joining]

    def _layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return cache_layers(self.cache)

    @torch.no_grad()
    def step(self) -> list[Row]:
        """Decode one token for every row; remove and return the rows that finished."""
        tokens = torch.tensor([[row.decoding.out.token_ids[-1]] for row in self.rows])
        positions = torch.tensor([[row.length] for row in self.rows])
        self.mask = F.pad(self.mask, (0, 1), value=1)
        logits = self.engine.model(input_ids=tokens, position_ids=positions, attention_mask=self.mask,
                                   past_key_values=self.cache, use_cache=True).logits[:, -1]
        finished, width = [], self.mask.shape[1]
        for i, (row, row_logits) in enumerate(zip(self.rows, logits)):
            row.length += 1
            if self.engine.advance(row.decoding, row_logits):
                finished.append(row)
                # its cache holds prompt + answer but the last token: keep a copy for the episode's next prompt
                self.store.add(row.prompt_ids + row.decoding.out.token_ids[:-1],
                               [(k[i : i + 1, :, width - row.length :].clone(),
                                 v[i : i + 1, :, width - row.length :].clone()) for k, v in self._layers()])
        if finished:
            self._keep([i for i, row in enumerate(self.rows) if row not in finished])
        return finished

    def _keep(self, keep: list[int]) -> None:
        """Keep only rows `keep`, then cut the leading columns no kept row uses."""
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.clear()
            return
        index = torch.tensor(keep)
        mask = self.mask[index]
        first = int(mask.any(0).nonzero()[0])
        self.cache = DynamicCache([(k[index, :, first:], v[index, :, first:]) for k, v in self._layers()])
        self.mask = mask[:, first:]

    def clear(self) -> list[Row]:
        """Empty the batch; returns the rows it held."""
        rows, self.rows, self.cache = self.rows, [], None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        return rows


class BatchScheduler:
    """Serves concurrent `generate` calls from one asyncio loop with a `DecodeBatch` of at most `max_batch` rows.

    The model runs in a worker thread, one tick at a time, under `lock` (the server takes the same lock to load
    weights, so a weight sync never interleaves with a forward). While the engine's `aborted` flag is set, every
    running and waiting request returns at once with stop_reason "aborted" and the tokens it has.
    """

    def __init__(self, engine: HFGenerator, max_batch: int, lock: asyncio.Lock | None = None,
                 prefix_cache_bytes: int = PREFIX_CACHE_BYTES):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: expected >= 1")
        self.engine, self.max_batch = engine, max_batch
        self.lock = lock or asyncio.Lock()
        self.batch = DecodeBatch(engine, prefix_cache_bytes)
        self.waiting: deque[Row] = deque()
        self.task: asyncio.Task | None = None
        self.ticks = self.peak_batch = self.served = self.tokens = 0  # since the last take_stats()

    async def generate(self, prompt_ids: list[int], s: Sampling) -> Generation:
        """Queue one request and wait for its own output."""
        loop = asyncio.get_running_loop()
        row = Row(self.engine.start(prompt_ids, s), list(prompt_ids), loop.create_future())
        self.waiting.append(row)
        if self.task is None or self.task.done() or self.task.get_loop() is not loop:  # tests run one loop each
            self.task = loop.create_task(self._serve())
        return await row.future

    async def _serve(self) -> None:
        while self.waiting or self.batch.rows:
            if self.engine.aborted:  # no tick is running here: the batch is safe to empty from the loop
                for row in [*self.batch.clear(), *self.waiting]:
                    _resolve(row, result=row.decoding.abort())
                self.waiting.clear()
                continue
            room = self.max_batch - len(self.batch.rows)
            admitted = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            admitted = [row for row in admitted if not row.future.done()]  # skip callers that gave up
            try:
                async with self.lock:
                    finished, failed = await asyncio.to_thread(self._tick, admitted)
            except Exception as exc:  # a failed forward fails every request it carried, not the server
                logger.exception("[hf rollout] batched decode step failed")
                finished, failed = [], [(row, exc) for row in [*admitted, *self.batch.clear()]]
            for row in finished:
                self.served += 1
                self.tokens += len(row.decoding.out.token_ids)
                _resolve(row, result=row.decoding.out)
            for row, exc in failed:
                _resolve(row, error=exc)

    def _tick(self, admitted: list[Row]) -> tuple[list[Row], list]:
        """One tick in the worker thread: admit, then decode one token for the batch. -> (finished, failed)."""
        finished, failed = self.batch.admit(admitted)
        self.peak_batch = max(self.peak_batch, len(self.batch.rows))
        if self.batch.rows:
            finished += self.batch.step()
            self.ticks += 1
        return finished, failed

    def clear_prefix_cache(self) -> None:
        """Forget every stored KV cache (call it under `lock` whenever the weights change)."""
        self.batch.store.clear()

    def take_stats(self) -> dict:
        """Requests served, tokens generated, decode steps, the largest batch and the prompt tokens the prefix store
        spared since the last call; resets them."""
        stats = {"requests": self.served, "tokens": self.tokens, "decode_steps": self.ticks,
                 "peak_batch": self.peak_batch, "prefix_reused_tokens": self.batch.store.reused_tokens}
        self.ticks = self.peak_batch = self.served = self.tokens = self.batch.store.reused_tokens = 0
        return stats


def _resolve(row: Row, result: Generation | None = None, error: Exception | None = None) -> None:
    """Hand a row's outcome to its caller (a caller that gave up has a cancelled future: nothing to do)."""
    if row.future is None or row.future.done():
        return
    if error is not None:
        row.future.set_exception(error)
    else:
        row.future.set_result(result)
