"""transformers' ``generate()`` in the trainer's process, in place of an SGLang engine (``rollout.backend:
transformers``): the reference sampler, the one TRL's ``GRPOTrainer`` uses.

It speaks the same requests and answers as :class:`~.sglang_backends.EmbeddedBackend` (SGLang's
``input_ids`` + ``sampling_params`` in, ``output_ids`` + ``meta_info`` out), so
:class:`~.sglang_engine.SGLangEngine` and everything above it run unchanged: weight sync loads the trainer's
tensors by HF name into the model, the engine log-probs feed the drift metric. What differs from SGLang
is the generation itself: one padded batch through ``model.generate`` (no radix cache, no paged KV),
transformers' sampler under a torch generator state of its own (seeded with the engine's
``random_seed``, carried from call to call; the trainer's global RNG is left as it was).

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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(server_args.get("random_seed", 0)))
            self._rng = torch.random.get_rng_state()
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
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for k, it in enumerate(items):  # left padding: every prompt ends where generation starts
            p = it["input_ids"]
            ids[k, width - len(p):] = torch.tensor(p)
            mask[k, width - len(p):] = 1
        from transformers import GenerationConfig

        # a fresh config, as TRL builds it (nothing inherited from the model's generation_config.json)
        kw = dict(do_sample=temperature > 0, max_new_tokens=max_new, pad_token_id=self.pad_id,
                  eos_token_id=stop_ids or None, repetition_penalty=1.0, disable_compile=True)
        if temperature > 0:
            top_k = int(sp.get("top_k", -1))
            kw.update(temperature=temperature, top_p=float(sp.get("top_p", 1.0)), top_k=0 if top_k == -1 else top_k)
        if ignore_eos:  # as TRL's fixed-length mode: end-of-sequence ids masked until the limit
            kw["min_new_tokens"] = max_new
        gen = GenerationConfig(**kw)
        t0 = time.perf_counter()
        with torch.no_grad(), self._threads(), torch.random.fork_rng(devices=[]):
            torch.random.set_rng_state(self._rng)
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      generation_config=gen, return_dict_in_generate=True, output_logits=True)
            self._rng = torch.random.get_rng_state()
        latency = time.perf_counter() - t0
        new = out.sequences[:, width:].cpu()
        # log p(token) under log_softmax(logits / T) before top-k / top-p (what SGLang returns)
        logits = torch.stack(out.logits, dim=1).float().cpu()
        if temperature > 0:
            logits = logits / temperature
        lps = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        results = []
        for k in range(len(items)):
            toks = new[k].tolist()
            n, kind = len(toks), "length"
            if not ignore_eos:
                for t, tok in enumerate(toks):
                    if tok in stop_ids:
                        n, kind = t + 1, "stop"
                        break
            out_ids = toks[:n]
            text = (self.tokenizer.decode(out_ids, skip_special_tokens=bool(sp.get("skip_special_tokens", True)))
                    if self.tokenizer is not None else None)
            results.append({"output_ids": out_ids, "text": text, "meta_info": {
                "finish_reason": {"type": kind},
                "output_token_logprobs": [[float(lps[k, t]), tok, None] for t, tok in enumerate(out_ids)],
                "weight_version": self.version, "e2e_latency": latency}})
        return results

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
