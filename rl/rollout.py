"""Rollouts on our model: batched sampling with the decode cache, per-token log-probs, routing records.

`generate` samples responses to token prompts (temperature, top-p, stop tokens, a length limit) from a
seeded `torch.Generator`, and returns the sampled tokens, their log-probabilities under the tempered
model distribution `log_softmax(logits / T)` (greedy: T = 1) and, optionally, every MoE layer's expert
choices. `token_logprobs` is the training side: one forward pass over prompt + response that yields the
same log-probabilities (and can replay the recorded routing). `use_cache=False` decodes by recomputing
the whole prefix every step: the plain reference of the cached path.

Layout: response row b holds `T` slots (tokens after its end are `<|pad|>`, mask 0); the stop token is
part of the response (it takes loss). The training sequence of row b is prompt_b + response_b, right
padded; routing tensors are `[B, S - 1, k]`, aligned with the training input `sequences()[0][:, :-1]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data.chat import STOP_IDS, render_prompt
from data.tokenizer import PAD
from model.errors import ConfigError, MoeforgeError


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = STOP_IDS
    use_cache: bool = True
    record_routing: bool = False

    def validate(self) -> SamplingConfig:
        if self.max_new_tokens < 1:
            raise ConfigError("grpo.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError("grpo.temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError("grpo.top_p", f"must be in (0, 1], got {self.top_p}")
        return self


@dataclass
class Rollout:
    prompts: list[list[int]]
    tokens: torch.Tensor  # [B, T] long, PAD after each response's end
    logp: torch.Tensor  # [B, T] float32, 0 where mask is 0
    mask: torch.Tensor  # [B, T] float32, 1 = a generated token (the stop token included)
    stopped: torch.Tensor  # [B] bool: ended with a stop token (False: cut at max_new_tokens)
    routing: list[torch.Tensor] | None = None  # per MoE layer [B, S - 1, k], see the module docstring
    temperature: float = 1.0

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(1).long()

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt + response ids [B, S] right padded with PAD, prompt lengths [B])."""
        return join_sequences(self.prompts, self.tokens, self.lengths)

    def texts(self, tok) -> list[str]:
        """Decoded responses without their stop token."""
        out = []
        for row, n, stop in zip(self.tokens.tolist(), self.lengths.tolist(), self.stopped.tolist()):
            out.append(tok.decode(row[: n - 1 if stop else n], skip_special_tokens=True))
        return out

    def select(self, idx: torch.Tensor) -> Rollout:
        """The rollout of rows `idx` (routing trimmed to the new training width)."""
        rows = idx.tolist()
        sub = Rollout([self.prompts[i] for i in rows], self.tokens[idx], self.logp[idx], self.mask[idx],
                      self.stopped[idx], None, self.temperature)
        if self.routing is not None:
            width = sub.sequences()[0].shape[1] - 1
            sub.routing = [r[idx, :width] for r in self.routing]
        return sub


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """One rollout of the rows of `parts` in order (responses and routing right padded to the widest)."""
    if not parts:
        raise MoeforgeError("concat_rollouts: no rollouts")
    if len(parts) == 1:
        return parts[0]
    if len({p.temperature for p in parts}) > 1 or len({p.routing is None for p in parts}) > 1:
        raise MoeforgeError("concat_rollouts: the rollouts differ in temperature or in routing records")
    t = max(p.tokens.shape[1] for p in parts)

    def widen(x: torch.Tensor, width: int, fill) -> torch.Tensor:
        pad = x.new_full((x.shape[0], width - x.shape[1], *x.shape[2:]), fill)
        return torch.cat([x, pad], 1)

    out = Rollout([q for p in parts for q in p.prompts], torch.cat([widen(p.tokens, t, PAD) for p in parts]),
                  torch.cat([widen(p.logp, t, 0.0) for p in parts]),
                  torch.cat([widen(p.mask, t, 0.0) for p in parts]), torch.cat([p.stopped for p in parts]),
                  None, parts[0].temperature)
    if parts[0].routing is not None:
        width = out.sequences()[0].shape[1] - 1
        out.routing = []
        for layer in zip(*(p.routing for p in parts)):
            k = layer[0].shape[-1]
            filler = torch.arange(k, device=layer[0].device)  # any valid expert ids: padding takes no loss
            rows = [torch.cat([r, filler.expand(r.shape[0], width - r.shape[1], k)], 1) for r in layer]
            out.routing.append(torch.cat(rows))
    return out


def join_sequences(prompts: list[list[int]], tokens_BT: torch.Tensor, lengths_B: torch.Tensor):
    """Right-padded prompt + response rows [B, S] and the prompt lengths [B]."""
    plen = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    width = int((plen + lengths_B.cpu()).max())
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    for b, (p, n) in enumerate(zip(prompts, lengths_B.tolist())):
        ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        ids[b, len(p) : len(p) + n] = tokens_BT[b, :n].cpu()
    return ids.to(tokens_BT.device), plen.to(tokens_BT.device)


def task_prompt(task: dict, tok, system: str | None = None) -> list[int]:
    """Prompt ids of a task record: optional system message, the user prompt, then `<|assistant|>`."""
    head = [{"role": "system", "content": system}] if system else []
    return render_prompt(head + [{"role": "user", "content": task["prompt"]}], tok, "domain")


def right_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MoeforgeError("rollout: every prompt needs at least one token")
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    ids = torch.full((len(prompts), int(lengths.max())), PAD, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    return ids, lengths


# ---------------------------------------------------------------------------------------------- sampling
def top_p_filter(probs_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches `top_p`; renormalise."""
    if top_p >= 1.0:
        return probs_BV
    sorted_p, order = probs_BV.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above
    keep_sorted = before < top_p  # the top token always stays
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs_BV * keep
    return kept / kept.sum(-1, keepdim=True)


def sample_next(logits_BV: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None):
    """(tokens [B], their log-probs under log_softmax(logits / T) [B])."""
    logits = logits_BV.float()
    if cfg.temperature == 0:
        logp_all = F.log_softmax(logits, -1)
        tokens = logits.argmax(-1)
    else:
        logp_all = F.log_softmax(logits / cfg.temperature, -1)
        probs = top_p_filter(logp_all.exp(), cfg.top_p)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return tokens, logp_all.gather(1, tokens[:, None]).squeeze(1)


# ---------------------------------------------------------------------------------------------- decoding
class _CachedDecoder:
    """Prefill once, then one token per row per step through the model's DecodeCache."""

    def __init__(self, model, ids_BP: torch.Tensor, lengths_B: torch.Tensor, record: bool):
        if not hasattr(model, "new_cache"):
            raise ConfigError("grpo.use_cache", "this model has no decode cache (Transformer.new_cache); "
                              "set it to false to decode by recomputation")
        self.model, self.ids, self.lengths, self.record = model, ids_BP, lengths_B, record
        self.cache = model.new_cache(ids_BP.shape[0])

    def _kw(self) -> dict:
        return {"return_routing": True} if self.record else {}

    def prefill(self):
        out = self.model(self.ids, cache=self.cache, lengths=self.lengths, with_mtp=False, **self._kw())
        rows = torch.arange(self.ids.shape[0], device=self.ids.device)
        return out.logits[rows, self.lengths - 1], (out.routing if self.record else None)

    def step(self, tokens_B: torch.Tensor):
        out = self.model(tokens_B[:, None], cache=self.cache, with_mtp=False, **self._kw())
        return out.logits[:, -1], ([r[:, -1] for r in out.routing] if self.record else None)


class _RecomputeDecoder:
    """The reference: every step runs the whole right-padded prefix through the model (no cache)."""

    def __init__(self, model, ids_BP: torch.Tensor, lengths_B: torch.Tensor, record: bool):
        self.model, self.record = model, record
        self.ids, self.lengths = ids_BP, lengths_B.clone()
        self.rows = torch.arange(ids_BP.shape[0], device=ids_BP.device)

    def _forward(self):
        kw = {"return_routing": True} if self.record else {}
        return self.model(self.ids, with_mtp=False, **kw)

    def prefill(self):
        out = self._forward()
        return out.logits[self.rows, self.lengths - 1], (out.routing if self.record else None)

    def step(self, tokens_B: torch.Tensor):
        pad = torch.full((self.ids.shape[0], 1), PAD, dtype=self.ids.dtype, device=self.ids.device)
        self.ids = torch.cat([self.ids, pad], 1)
        self.ids[self.rows, self.lengths] = tokens_B
        self.lengths = self.lengths + 1
        out = self._forward()
        last = self.lengths - 1
        routing = [r[self.rows, last] for r in out.routing] if self.record else None
        return out.logits[self.rows, last], routing


class _RoutingRecord:
    """Per-layer expert ids in the training layout (row b: prompt_b then response_b)."""

    def __init__(self, prefill: list[torch.Tensor], lengths_B: torch.Tensor, max_new: int):
        b, p, k = prefill[0].shape
        filler = torch.arange(k, device=prefill[0].device).expand(b, p + max_new, k)
        self.layers = [filler.clone() for _ in prefill]
        for full, r in zip(self.layers, prefill):
            full[:, :p] = r
        self.lengths, self.rows = lengths_B, torch.arange(b, device=lengths_B.device)

    def add(self, step: int, routing: list[torch.Tensor]) -> None:
        """Routing of the token fed at decode `step` (response token `step`)."""
        for full, r in zip(self.layers, routing):
            full[self.rows, self.lengths + step] = r.reshape(full.shape[0], -1)

    def trimmed(self, width: int) -> list[torch.Tensor]:
        return [full[:, :width] for full in self.layers]


@torch.no_grad()
def generate(model, prompts: list[list[int]], cfg: SamplingConfig | None = None,
             generator: torch.Generator | None = None) -> Rollout:
    """Sample one response per prompt (repeat a prompt G times for a group); see the module docstring."""
    cfg = (cfg or SamplingConfig()).validate()
    device = next(model.parameters()).device
    ids, lengths = right_pad(prompts, device)
    was_training = model.training
    model.eval()
    try:
        decoder = (_CachedDecoder if cfg.use_cache else _RecomputeDecoder)(model, ids, lengths,
                                                                          cfg.record_routing)
        logits, routing = decoder.prefill()
        record = _RoutingRecord(routing, lengths, cfg.max_new_tokens) if cfg.record_routing else None
        b, t_max = len(prompts), cfg.max_new_tokens
        tokens = torch.full((b, t_max), PAD, dtype=torch.long, device=device)
        logp = torch.zeros(b, t_max, device=device)
        mask = torch.zeros(b, t_max, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        stopped = torch.zeros(b, dtype=torch.bool, device=device)
        stop_ids = torch.tensor(cfg.stop_ids, device=device)
        for t in range(t_max):
            tok, lp = sample_next(logits, cfg, generator)
            live = ~done
            tokens[:, t] = torch.where(live, tok, PAD)
            logp[:, t] = torch.where(live, lp, 0.0)
            mask[:, t] = live.float()
            is_stop = live & torch.isin(tok, stop_ids)
            stopped |= is_stop
            done |= is_stop
            if bool(done.all()) or t == t_max - 1:
                break
            logits, routing = decoder.step(tokens[:, t])
            if record is not None:
                record.add(t, routing)
    finally:
        model.train(was_training)
    out = Rollout(prompts, tokens, logp, mask, stopped, None, cfg.temperature or 1.0)
    if record is not None:
        out.routing = record.trimmed(out.sequences()[0].shape[1] - 1)
    return out


# ---------------------------------------------------------------------------------------------- training side
def token_logprobs(model, rollout: Rollout, *, replay: bool = False, entropy: bool = False):
    """Log-probs [B, T] of the rollout's response tokens from one forward pass over prompt + response
    (with gradients when enabled); with `entropy`, also the tempered distribution's entropy [B, T]."""
    ids, plen = rollout.sequences()
    kw = {}
    if replay:
        if rollout.routing is None:
            raise ConfigError("grpo.router_replay", "the rollout recorded no routing (record_routing=True)")
        kw["routing"] = rollout.routing
    out = model(ids[:, :-1], with_mtp=False, **kw)
    t = rollout.tokens.shape[1]
    pos = (plen[:, None] - 1 + torch.arange(t, device=ids.device)).clamp(max=ids.shape[1] - 2)
    logits = out.logits.gather(1, pos[..., None].expand(-1, -1, out.logits.shape[-1])).float()
    logp_all = F.log_softmax(logits / rollout.temperature, -1)
    logp = logp_all.gather(-1, rollout.tokens[..., None]).squeeze(-1) * rollout.mask
    ent = None
    if entropy:
        ent = -(logp_all.exp() * logp_all).sum(-1) * rollout.mask
    return logp, ent


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_tasks(model, tok, tasks: list[dict], *, max_new_tokens: int, batch_size: int = 64,
                   system: str | None = None, use_cache: bool = True, temperature: float = 0.0,
                   samples: int = 1, seed: int = 0) -> dict:
    """Held-out evaluation: accuracy and format rate over `tasks` (rewards of rl.rewards).

    `temperature` 0 decodes greedily (one response per task); above 0 it draws `samples` responses per
    task from a generator seeded with `seed` and averages over all of them (mean@samples)."""
    from rl.rewards import score_batch

    if samples < 1 or (temperature == 0 and samples != 1):
        raise ConfigError("grpo.eval_samples", f"must be >= 1 (1 when greedy), got {samples}")
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, use_cache=use_cache)
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed) if temperature else None
    rows = [t for t in tasks for _ in range(samples)]
    results = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        roll = generate(model, [task_prompt(t, tok, system) for t in chunk], cfg, generator)
        results += score_batch(chunk, roll.texts(tok))
    n = max(len(results), 1)
    return {"accuracy": sum(r["correct"] for r in results) / n,
            "format_rate": sum(r["format_ok"] for r in results) / n, "n": len(tasks)}
