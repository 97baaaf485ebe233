"""Token-in/token-out generation and weight loading with plain transformers (no verl, no ray).

The engine behind the `hf` rollout server (`selfemo_verl.cpu.hf_rollout`). It honours the sampling
parameters verl's agent loops send to vLLM: temperature, top_p, top_k, max_tokens (or max_new_tokens),
repetition_penalty, stop (strings), stop_token_ids, ignore_eos, logprobs.

Log-probabilities follow verl's default `logprobs_mode=processed_logprobs`: log_softmax(logits / T) of the
sampled token (T = 1 for greedy), i.e. what the actor recomputes, before top-k/top-p truncation.

`HFGenerator.generate` decodes one request alone; `selfemo_verl.cpu.hf_batching` decodes many together with the
same per-request steps (`HFGenerator.prefill`, `HFGenerator.advance`). A request's `seed` (vLLM's per-request
sampling seed) gives it its own generator, so its sampled tokens do not depend on the requests around it;
without one it draws from the engine's generator (seeded once by the server), in whatever order requests come.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

GREEDY_BELOW = 1e-5  # a temperature this small means greedy decoding, as in vLLM
ATTENTION = "selfemo_sdpa_gqa"  # the attention the server's model runs (registered by `load_model`)


def sdpa_gqa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       is_causal=None, **kwargs):
    """transformers' "sdpa" attention, but grouped-query heads always go to the kernel (`enable_gqa`).

    transformers repeats K and V once per query head whenever a mask is given (the CUDA kernels need it), and every
    batched decode step or prefill after a cached prefix has a mask; on CPU torch's kernel takes the mask with
    `enable_gqa` and gives the same numbers, 8x faster for SmolLM2 at batch 16 (9 query / 3 KV heads, 450 columns).
    Shapes: query [B, H, q, D], key/value [B, H_kv, T, D] -> ([B, q, H, D], None).
    """
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=bool(query.shape[2] > 1 and attention_mask is None and causal),
        enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def load_model(path, dtype: torch.dtype):
    """A causal LM from an HF directory in `dtype`, with `ATTENTION` (registered here, with sdpa's masks)."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, sdpa_gqa_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTENTION).eval()


@dataclass(frozen=True)
class Sampling:
    """Parsed sampling parameters of one request."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset = frozenset()
    ignore_eos: bool = False
    logprobs: bool = False
    seed: int | None = None


def _wants_logprobs(value) -> bool:
    """verl sends a bool; vLLM callers send an int count (0 = the sampled token only) or None."""
    return value is not None and value is not False


def parse_sampling(params: dict, default_max_tokens: int, room: int) -> Sampling:
    """Sampling from a verl/vLLM-style dict; max_tokens defaults to `default_max_tokens`, clamped to [1, room].

    >>> parse_sampling({"temperature": 0, "max_tokens": 99, "stop": "x"}, 16, 50)
    Sampling(max_tokens=50, temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, stop=('x',), stop_token_ids=frozenset(), ignore_eos=False, logprobs=False, seed=None)
    """
    max_tokens = params.get("max_tokens", params.get("max_new_tokens")) or default_max_tokens
    stop = params.get("stop") or ()
    seed = params.get("seed")
    return Sampling(
        max_tokens=max(1, min(int(max_tokens), room)),
        temperature=float(params.get("temperature", 1.0)),
        top_p=float(params.get("top_p", 1.0)),
        top_k=int(params.get("top_k", -1)),
        repetition_penalty=float(params.get("repetition_penalty", 1.0) or 1.0),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        stop_token_ids=frozenset(params.get("stop_token_ids") or ()),
        ignore_eos=bool(params.get("ignore_eos", False)),
        logprobs=_wants_logprobs(params.get("logprobs")),
        seed=None if seed is None else int(seed),
    )


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on already-seen tokens: positive logits / p, negative logits * p.

    >>> apply_repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), torch.tensor([0, 1]), 2.0).tolist()
    [1.0, -4.0, 1.0]
    """
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    logits = logits.clone()
    picked = logits[seen]
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def truncate_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest top-p nucleus to -inf ([V] -> [V]).

    >>> truncate_top_k_top_p(torch.tensor([3.0, 2.0, 1.0]), top_k=2, top_p=1.0).tolist()
    [3.0, 2.0, -inf]
    """
    logits = logits.clone()
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        outside = torch.cumsum(probs, -1) - probs > top_p  # keep the first token that crosses top_p
        logits[order[outside]] = float("-inf")
    return logits


def sample_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> tuple[int, float]:
    """One token from last-position logits [V], with its processed log-probability."""
    greedy = s.temperature < GREEDY_BELOW
    scaled = logits.float() / (1.0 if greedy else s.temperature)
    logp = torch.log_softmax(scaled, -1)
    if greedy:
        token = int(torch.argmax(scaled))
    else:
        probs = torch.softmax(truncate_top_k_top_p(scaled, s.top_k, s.top_p), -1)
        # torch's one-sample multinomial is an exponential race (argmax p_i / E_i): a rounding-size change of the
        # logits (batched vs alone) almost never changes the winner, unlike an inverse-CDF draw in the long tail
        token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logp[token])


@dataclass
class Generation:
    """Result of one request: response token ids, optional log-probs and why it stopped."""

    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] | None = None
    stop_reason: str = "completed"  # "completed" (eos, stop, length) or "aborted", as verl expects


@dataclass(eq=False)
class Decoding:
    """One request being decoded: its sampling, its generator, the tokens its penalty sees, its output so far."""

    sampling: Sampling
    generator: torch.Generator
    seen: torch.Tensor
    out: Generation

    def abort(self) -> Generation:
        self.out.stop_reason = "aborted"
        return self.out


class HFGenerator:
    """A causal LM + tokenizer; `generate` decodes one request at a time with a KV cache."""

    def __init__(self, model, tokenizer, eos_token_ids, seed: int = 0):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.generator = torch.Generator().manual_seed(seed)
        self.aborted = False

    def _stop(self, token: int, tokens: list[int], s: Sampling) -> bool:
        if len(tokens) >= s.max_tokens or token in s.stop_token_ids:
            return True
        if not s.ignore_eos and token in self.eos_token_ids:
            return True
        if s.stop:
            tail = self.tokenizer.decode(tokens[-32:], skip_special_tokens=False)
            return any(stop in tail for stop in s.stop)
        return False

    def start(self, prompt_ids: list[int], s: Sampling) -> Decoding:
        """A request's decoding state; its own generator when it carries a seed, else the engine's."""
        generator = self.generator if s.seed is None else torch.Generator().manual_seed(s.seed)
        return Decoding(s, generator, torch.tensor(list(prompt_ids), dtype=torch.long),
                        Generation(log_probs=[] if s.logprobs else None))

    @torch.no_grad()
    def prefill(self, prompt_ids: list[int], past=None):
        """(logits [V] at the prompt's last position, KV cache) of one prompt, alone (no padding); with `past`, the
        KV cache of the tokens before `prompt_ids`, only these are computed."""
        out = self.model(input_ids=torch.tensor([list(prompt_ids)]), past_key_values=past, use_cache=True,
                         logits_to_keep=1)
        return out.logits[0, -1], out.past_key_values

    def advance(self, d: Decoding, logits: torch.Tensor) -> bool:
        """Sample d's next token from its last-position logits [V]; True when d is finished (eos, stop, length)."""
        s = d.sampling
        token, logp = sample_token(apply_repetition_penalty(logits, d.seen, s.repetition_penalty), s, d.generator)
        d.out.token_ids.append(token)
        if d.out.log_probs is not None:
            d.out.log_probs.append(logp)
        if self._stop(token, d.out.token_ids, s):
            return True
        if s.repetition_penalty != 1.0:
            d.seen = torch.cat([d.seen, torch.tensor([token])])
        return False

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], s: Sampling) -> Generation:
        """Decode up to s.max_tokens tokens after prompt_ids, alone; stops at eos / stop ids / stop strings."""
        d = self.start(prompt_ids, s)
        if self.aborted:
            return d.abort()
        logits, cache = self.prefill(prompt_ids)
        while not self.advance(d, logits):
            if self.aborted:
                return d.abort()
            step = self.model(input_ids=torch.tensor([[d.out.token_ids[-1]]]), past_key_values=cache, use_cache=True)
            logits, cache = step.logits[0, -1], step.past_key_values
        return d.out

    def load_weights(self, named_tensors) -> dict:
        """Copy (name, tensor) pairs into the model in place; returns `WeightSync.report()`."""
        sync = WeightSync(self.model)
        sync.load(named_tensors)
        return sync.report()


class WeightSync:
    """One weight sync, possibly in several buckets: copies tensors in place and counts what arrived.

    A complete sync has loaded == received == model_tensors (tied aliases count once loaded) and
    missing == unexpected == mismatched == 0. It also measures what arrived (float64 sums over the loaded
    tensors, in the model's dtype): `norm` = ‖w_new‖₂ and `delta_norm` = ‖w_new − w_old‖₂, w_old being what
    the model held before this sync (for sync k+1: the tensors of sync k), so a test can tell that a training
    step moved the weights, and by how much.
    """

    def __init__(self, model):
        self.state = model.state_dict()
        self.loaded: set[str] = set()
        self.unexpected: list[str] = []
        self.mismatched: list[str] = []
        self.norm_sq = 0.0
        self.delta_sq = 0.0

    @torch.no_grad()
    def load(self, named_tensors) -> None:
        for name, tensor in named_tensors:
            target = self.state.get(name)
            if target is None:
                self.unexpected.append(name)
            elif tuple(target.shape) != tuple(tensor.shape):
                self.mismatched.append(name)
            else:
                new = tensor.to(target.dtype)
                self.norm_sq += float(torch.linalg.vector_norm(new, dtype=torch.float64)) ** 2
                self.delta_sq += float(torch.linalg.vector_norm(new - target, dtype=torch.float64)) ** 2
                target.copy_(new)
                self.loaded.add(name)

    def report(self) -> dict:
        """Counts: received, loaded, unexpected (names the model lacks), mismatched (wrong shape), missing
        (model tensors not received, except tied aliases of a loaded tensor), model_tensors; and the loaded
        tensors' `norm` and `delta_norm` (see the class)."""
        loaded_ptrs = {self.state[name].data_ptr() for name in self.loaded}
        missing = [n for n, t in self.state.items() if n not in self.loaded and t.data_ptr() not in loaded_ptrs]
        return {"received": len(self.loaded) + len(self.unexpected) + len(self.mismatched),
                "loaded": len(self.loaded), "unexpected": len(self.unexpected), "mismatched": len(self.mismatched),
                "missing": len(missing), "model_tensors": len(self.state),
                "missing_names": missing[:8], "unexpected_names": self.unexpected[:8],
                "norm": math.sqrt(self.norm_sq), "delta_norm": math.sqrt(self.delta_sq)}
