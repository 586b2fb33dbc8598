"""A transformers model in the trainer's process, in place of an SGLang engine (``rollout.backend:
transformers``): the HF implementation of the model, sampled by a short decode loop of our own.

It speaks the same requests and answers as :class:`~.sglang_backends.EmbeddedBackend` (SGLang's
``input_ids`` + ``sampling_params`` in, ``output_ids`` + ``meta_info`` out), so
:class:`~.sglang_engine.SGLangEngine` and everything above it run unchanged: weight sync loads the trainer's
tensors by HF name into the model, the engine log-probs feed the drift metric. What differs from SGLang
is the generation itself: one left-padded batch, each distinct prompt prefilled once and its KV cache
copied to its group's rows (SGLang's radix cache does the same), finished rows dropped from the batch
(as SGLang drops finished requests), one exact categorical draw per row and step (inverse CDF) from a
generator of its own, seeded with the engine's ``random_seed`` and carried from call to call (the
trainer's global RNG is not drawn from). transformers' ``generate()`` is not used: per step it spends
more on ``torch.multinomial``'s exponentials, logits processors and re-concatenated masks than the
model's attention (``bench/sampling_vs_transformers.py --backend transformers --fixed-length`` times both).

For parity checks (``bench/learning_vs_trl.py``: is it the sampler?) and small CPU runs (on 2 cores it
generates for SmolLM2-135M faster than SGLang's CPU engine, which lacks its kernels): embedded mode, one
engine, no TP. ``release_memory`` keeps the weights (CPU), the distributed weight transport is refused.
"""

from __future__ import annotations

import contextlib
import time

import torch

from .interface import RolloutEngineError, TensorBucket, TensorMeta

__all__ = ["TransformersBackend"]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Token positions of left-padded rows, as transformers' generate counts them (padding at 0)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


class TransformersBackend:
    """One HF causal LM in this process; see the module docstring."""

    def __init__(self, server_args: dict, cpu_threads: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = server_args["model_path"]
        self.name = f"transformers:{path}"
        self.tp_size = 1
        self.device = server_args.get("device", "cpu")
        dtype = getattr(torch, server_args.get("dtype", "float32"))
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.tokenizer = None if server_args.get("skip_tokenizer_init") else AutoTokenizer.from_pretrained(path)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = self.model.generation_config.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self.threads = cpu_threads
        self.version = "default"
        # the draws' own generator (CPU), seeded with the engine's random_seed: the trainer's RNG is not drawn from
        self._gen = torch.Generator().manual_seed(int(server_args.get("random_seed", 0)))
        # every HF name, tied aliases included (lm_head.weight and model.embed_tokens.weight are one tensor)
        self._params = dict(self.model.state_dict(keep_vars=True))

    # -- requests -------------------------------------------------------------------------------
    def generate(self, items: list[dict]) -> list[dict]:
        if not items:
            return []
        prompts = [it for it in items if it.get("logprob_start_len", -1) < 0]
        scores = [it for it in items if it.get("logprob_start_len", -1) >= 0]
        if prompts and scores:
            raise RolloutEngineError(f"{self.name}: a call mixes generation and scoring requests")
        return self._score(items) if scores else self._generate(items)

    @contextlib.contextmanager
    def _threads(self):
        """CPU: ``cpu_threads`` torch threads while generating (the ranks wait), the caller's after."""
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _generate(self, items: list[dict]) -> list[dict]:
        sp = {k: v for k, v in items[0]["sampling_params"].items() if k != "sampling_seed"}
        for it in items[1:]:
            if {k: v for k, v in it["sampling_params"].items() if k != "sampling_seed"} != sp:
                raise RolloutEngineError(f"{self.name}: one generate call takes one set of sampling params")
        temperature = float(sp.get("temperature", 1.0))
        max_new = int(sp.get("max_new_tokens", 128))
        stop_ids = list(dict.fromkeys(self.eos_ids + [int(t) for t in sp.get("stop_token_ids") or []]))
        if sp.get("stop"):
            raise RolloutEngineError(f"{self.name}: stop strings are not supported; use stop_token_ids")
        ignore_eos = bool(sp.get("ignore_eos"))
        top_k, top_p = int(sp.get("top_k", -1)), float(sp.get("top_p", 1.0))
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for k, it in enumerate(items):  # left padding: every prompt ends where generation starts
            p = it["input_ids"]
            ids[k, width - len(p):] = torch.tensor(p)
            mask[k, width - len(p):] = 1
        t0 = time.perf_counter()
        with torch.no_grad(), self._threads():
            toks, lps, lengths = self._decode(ids.to(self.device), mask.to(self.device), max_new, temperature,
                                              top_k, top_p, [] if ignore_eos else stop_ids)
        latency = time.perf_counter() - t0
        results = []
        for k in range(len(items)):
            out_ids = toks[k, :lengths[k]].tolist()
            kind = "stop" if out_ids and not ignore_eos and out_ids[-1] in stop_ids else "length"
            text = (self.tokenizer.decode(out_ids, skip_special_tokens=bool(sp.get("skip_special_tokens", True)))
                    if self.tokenizer is not None else None)
            results.append({"output_ids": out_ids, "text": text, "meta_info": {
                "finish_reason": {"type": kind},
                "output_token_logprobs": [[float(lps[k, t]), tok, None] for t, tok in enumerate(out_ids)],
                "weight_version": self.version, "e2e_latency": latency}})
        return results

    def _decode(self, ids: torch.Tensor, mask: torch.Tensor, max_new: int, temperature: float, top_k: int,
                top_p: float, stops: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Up to ``max_new`` tokens per row (left-padded ``ids``): tokens ``[B, max_new]``, their log-probs under
        ``log_softmax(logits / T)`` before top-k / top-p (what SGLang returns), and each row's length. A row
        leaves the batch at its first stop token (its cache rows are dropped, as SGLang drops a finished
        request); positions are the mask's cumulative sum, as transformers' generate counts them."""
        rows = ids.shape[0]
        toks = torch.full((rows, max_new), self.pad_id, dtype=torch.long)
        lps = torch.zeros((rows, max_new), dtype=torch.float32)
        lengths = torch.zeros(rows, dtype=torch.long)
        live = torch.arange(rows)  # output rows still generating, in batch order
        cache = self._prefill_once(ids, mask)  # every prompt but its last token; None for 1-token prompts
        x, attn, pos = (ids[:, -1:], mask, mask.sum(-1, keepdim=True) - 1) if cache is not None else \
            (ids, mask, _positions(mask))
        stop_ids = torch.tensor(stops, device=ids.device, dtype=torch.long)
        for t in range(max_new):
            out = self.model(input_ids=x, attention_mask=attn, position_ids=pos, cache=cache, use_cache=True,
                             logits_to_keep=1)
            cache, logits = out.cache, out.logits[:, -1].float()
            logp = torch.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)
            nxt = logp.argmax(-1) if temperature <= 0 else self._draw(logp.exp(), top_k, top_p)
            toks[live, t] = nxt.cpu()
            lps[live, t] = logp.gather(-1, nxt[:, None]).squeeze(-1).cpu()
            lengths[live] = t + 1
            going = ~torch.isin(nxt, stop_ids)
            if t + 1 == max_new or not bool(going.any()):
                break
            if not bool(going.all()):
                keep = going.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                live, nxt, attn, pos = live[keep.cpu()], nxt[keep], attn[keep], pos[keep]
            x, pos = nxt[:, None], pos[:, -1:] + 1
            attn = torch.cat([attn, attn.new_ones(len(live), 1)], dim=1)
        return toks, lps, lengths

    def _draw(self, probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
        """One token per row from ``probs`` restricted to its top-k (``top_k`` > 0) and its top-p nucleus (a
        token is kept while the mass before it is <= ``top_p``, as SGLang's torch sampler), by inverse CDF
        with one uniform per row from this engine's generator (an exact categorical draw; 1.5 M
        exponentials a step for ``torch.multinomial`` at SmolLM2's vocab cost more than the forward's
        attention on CPU)."""
        order = None
        if top_k > 0 or top_p < 1.0:
            probs, order = probs.sort(dim=-1, descending=True)
            keep = torch.ones_like(probs, dtype=torch.bool)
            if top_k > 0:
                keep[:, top_k:] = False
            if top_p < 1.0:
                keep &= (probs.cumsum(-1) - probs) <= top_p
            probs = probs * keep
        cdf = probs.double().cumsum(-1)
        u = torch.rand(len(cdf), 1, generator=self._gen, dtype=torch.float64).to(cdf.device) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        return (pick if order is None else order.gather(-1, pick)).squeeze(-1)

    def _prefill_once(self, ids: torch.Tensor, mask: torch.Tensor):
        """The KV cache of every row's prompt but its last token, each distinct prompt computed once and
        copied to its rows, as SGLang's radix cache shares a group's prompt among its n samples (GRPO: a
        step's prefill shrinks n-fold); None when every prompt is one token. Positions: the mask's
        cumulative sum (left padding)."""
        if ids.shape[1] < 2:
            return None
        rows = [tuple(r) for r in ids.tolist()]
        first: dict[tuple, int] = {}
        for k, r in enumerate(rows):
            first.setdefault(r, k)
        uniq = list(first.values())
        u_ids, u_mask = ids[uniq, :-1], mask[uniq, :-1]
        cache = self.model(input_ids=u_ids, attention_mask=u_mask, position_ids=_positions(u_mask), use_cache=True,
                           logits_to_keep=1).cache
        if len(uniq) < len(rows):
            slot = {r: j for j, r in enumerate(first)}
            cache.batch_select_indices(torch.tensor([slot[r] for r in rows], device=ids.device))
        return cache

    def _score(self, items: list[dict]) -> list[dict]:
        results = []
        with torch.no_grad(), self._threads():
            for it in items:
                x = torch.tensor([it["input_ids"]], device=self.device)
                lp = torch.log_softmax(self.model(input_ids=x).logits[0, :-1].float(), dim=-1)
                vals = lp.gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1).cpu().tolist()
                results.append({"output_ids": [], "text": None, "meta_info": {
                    "finish_reason": {"type": "length"}, "weight_version": self.version,
                    "input_token_logprobs": [[None, int(it["input_ids"][0]), None]]
                    + [[v, int(t), None] for v, t in zip(vals, it["input_ids"][1:])]}})
        return results

    # -- weights ----------------------------------------------------------------------------------
    def _load(self, named_tensors) -> None:
        with torch.no_grad():
            for name, t in named_tensors:
                p = self._params.get(name)
                if p is None:
                    raise RolloutEngineError(f"{self.name}: no tensor named {name!r} in the model")
                if tuple(p.shape) != tuple(t.shape):
                    raise RolloutEngineError(f"{self.name}: {name} has shape {tuple(p.shape)}, got {tuple(t.shape)}")
                p.copy_(t)

    def begin_weight_update(self):
        pass

    def end_weight_update(self):
        pass

    def update_weights_from_bucket(self, bucket: TensorBucket, flush_cache: bool = False):
        self._load(bucket.tensors())

    def update_weights_from_tensors(self, named_tensors, flush_cache: bool = False):
        self._load(named_tensors)

    def init_weights_update_group(self, master_address, master_port, rank_offset, world_size, group_name, backend):
        raise RolloutEngineError(f"{self.name}: the distributed weight transport needs SGLang; "
                                 "use rollout.weight_sync tensor or disk")

    def update_weights_from_distributed(self, metas: list[TensorMeta], group_name: str, flush_cache: bool = False):
        self.init_weights_update_group(None, None, None, None, group_name, None)

    def destroy_weights_update_group(self, group_name: str):
        pass

    def update_weights_from_disk(self, path: str):
        from transformers import AutoModelForCausalLM

        src = AutoModelForCausalLM.from_pretrained(path, dtype=next(self.model.parameters()).dtype)
        self._load(src.state_dict().items())

    def set_weight_version(self, version: str):
        self.version = version

    def get_weight(self, name: str):
        p = self._params.get(name)
        if p is None:
            raise RolloutEngineError(f"{self.name}: no tensor named {name!r} in the model")
        return p.detach().float().cpu().tolist()  # nested lists, as SGLang answers

    def flush_cache(self):
        pass  # no cache kept between calls

    def pause_generation(self):
        pass

    def continue_generation(self):
        pass

    def release_memory(self, tags=None):
        pass

    def resume_memory(self, tags=None):
        pass

    def health(self) -> bool:
        return self.model is not None

    def describe(self) -> str:
        return self.name

    def shutdown(self):
        self.model = None
        self._params = {}
