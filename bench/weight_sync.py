"""Weight-sync benchmark on CPU: Megatron shards -> a real embedded SGLang engine, per transport.

    .venv/bin/python bench/weight_sync.py                       # ~0.5B (Qwen2.5-0.5B shapes), TP1PP1 and TP2PP2
    .venv/bin/python bench/weight_sync.py --size tiny --layouts 1x1 --transports tensor
    .venv/bin/python bench/weight_sync.py --size tiny --layouts none --fleet 2   # the fleet case only

For each layout a gloo world of tp*pp processes loads a random model (saved once as HF safetensors),
global rank 0 hosts the embedded engine, and every transport syncs ``--repeats`` times. Reported:
seconds and GB/s of HF bytes delivered (owner's clock, from pause to resumed generation), beside a
host memcpy of the same bytes (``torch.Tensor.copy_`` on all cores, best of 3) measured in the owner's
process just before every sync, so that each sync is compared with the memory bandwidth of its own
moment (on this VM a memcpy of 2 GB reads 11-20 GB/s from one minute to the next). The reference is
the median of those memcpys; "x memcpy" is that over the best sync, and over the median of the warm
syncs (all but the first, which moves the parameters into shared memory and faults the engine's
mappings in).
At TP > 1 the transport's own limit is measured beside it: the bytes a sync moves over TP (each
peer's shards, to its stage's sender) as one bare gather over the same gloo world (GB/s there count
those bytes, and "x memcpy" compares them with the same memcpy rate).

``--fleet N``: a DP=N gloo world with N SGLang CPU servers (one per replica, as a colocated fleet
starts them) fed by the tensor transport two ways, side by side: ``parallel`` (each replica feeds its
own engine, all at once) and ``one owner`` (rank 0 feeds all N engines, one after the other, as a run
funnelled through rank 0 would). Seconds are wall time over all ranks; GB/s counts the bytes that
reached all N engines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SIZES = {
    # Qwen2.5-0.5B shapes as a Llama (494M parameters, tied embeddings; Llama because SGLang's
    # get_weights_by_name, used for the spot check, does not serve Qwen2)
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    # ~40M parameters, same family: a quick smoke of the benchmark itself
    "tiny": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
}


def save_random_model(directory: str, size: str) -> int:
    """config.json + random float32 safetensors (written tensor by tensor). Returns HF bytes."""
    import transformers
    from safetensors.torch import save_file

    from holderpo_megatron.checkpoint import expected_hf_shapes
    from holderpo_megatron.models import ModelArch

    cfg = transformers.LlamaConfig(max_position_embeddings=2048, rope_theta=1e6, rms_norm_eps=1e-6,
                                   architectures=["LlamaForCausalLM"], **SIZES[size])
    cfg.torch_dtype = torch.float32
    cfg.save_pretrained(directory)
    arch = ModelArch.from_pretrained_dir(directory)
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in expected_hf_shapes(arch).items():
        state[name] = (torch.ones(shape) + 0.1 * torch.randn(shape, generator=g)) if "norm" in name \
            else 0.02 * torch.randn(shape, generator=g)
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * 4 for t in state.values())


class Memcpy:
    """The reference: ``nbytes`` copied by ``torch.Tensor.copy_`` on every core of the machine (both
    buffers allocated and touched once, here)."""

    def __init__(self, nbytes: int):
        self.src = torch.ones(nbytes, dtype=torch.uint8)
        self.dst = torch.zeros_like(self.src)
        self.threads = os.cpu_count() or 1

    def seconds(self, repeats: int = 3) -> float:
        """Best of ``repeats`` copies, on ``self.threads`` threads (this process's count restored)."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.dst.copy_(self.src)
                best = min(best, time.perf_counter() - t0)
            return best
        finally:
            torch.set_num_threads(before)


def _rank_main(rank, world, store, model_dir, tp, pp, transports, bucket_bytes, repeats, out_path, nbytes):
    import torch.distributed as dist

    torch.set_num_threads(1 if world > 1 else 2)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=900))
    engine = None
    try:
        if rank == 0:  # the engine first: the CPU Megatron layer patches torch.cuda in this process
            from holderpo_megatron.rollout import SGLangEngine, SGLangEngineConfig

            t0 = time.perf_counter()
            # mem_fraction_static counts the weights too: 2 GB of weights need ~0.1 of this machine
            engine = SGLangEngine(SGLangEngineConfig(model_path=model_dir, dtype="float32", skip_tokenizer_init=True,
                                                     context_length=256, mem_fraction_static=0.2))
            print(f"[tp{tp}pp{pp}] engine up in {time.perf_counter() - t0:.1f} s", flush=True)
        dist.barrier()
        from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

        enable_cpu_megatron()
        from holderpo_megatron.checkpoint import SafetensorsReader, load_hf_weights_into_model
        from holderpo_megatron.models import ModelArch
        from holderpo_megatron.parallel.layout import ParallelLayout, initialize_model_parallel
        from holderpo_megatron.trainer.actor import MegatronActor
        from holderpo_megatron.weight_sync import MegatronWeightSource, make_weight_synchronizer

        arch = ModelArch.from_pretrained_dir(model_dir)
        layout = ParallelLayout(tp=tp, pp=pp)
        initialize_model_parallel(layout)
        actor = MegatronActor(arch, layout, optimizer=None)
        load_hf_weights_into_model(actor.unwrapped(), arch, SafetensorsReader(model_dir))
        source = MegatronWeightSource(actor.unwrapped(), arch)  # TP > 1 on CPU: the shared TP gather
        memcpy = Memcpy(nbytes) if rank == 0 else None  # measured in the owner's process, before every sync
        results = []
        version = 0
        for transport in transports:
            # "tensor-packed": the tensor transport without zero-copy (every bucket packed flat);
            # "tensor-p2p": TP shards sent point to point (the GPU path) instead of read in place
            if transport == "tensor-p2p" and tp == 1:
                continue
            kw = dict(zero_copy=False) if transport == "tensor-packed" else {}
            src = MegatronWeightSource(actor.unwrapped(), arch, tp_gather="p2p") if transport == "tensor-p2p" \
                else source
            sync = make_weight_synchronizer(src, engine, dtype=torch.float32, transport=transport.split("-")[0],
                                            bucket_bytes=bucket_bytes, **kw)
            try:
                for r in range(repeats):
                    dist.barrier()  # the other ranks wait here while the owner measures the memcpy
                    copy_s = memcpy.seconds() if rank == 0 else 0.0
                    dist.barrier()
                    version += 1
                    rep = sync.sync(version)
                    if rank == 0:
                        results.append(dict(layout=f"TP{tp}PP{pp}", transport=transport, repeat=r,
                                            seconds=rep.seconds, bytes=rep.bytes, buckets=rep.buckets,
                                            gb_per_s=rep.gb_per_s, memcpy_s=copy_s))
                        print(f"[tp{tp}pp{pp}] {transport} #{r}: {rep.seconds:.2f} s, {rep.gb_per_s:.2f} GB/s, "
                              f"{rep.buckets} buckets (memcpy just before: {copy_s:.3f} s = "
                              f"{nbytes / copy_s / 1e9:.2f} GB/s)", flush=True)
            finally:
                sync.close()
            if rank == 0:  # spot check: the engine holds Megatron's values
                name = "model.norm.weight"
                want = SafetensorsReader(model_dir)[name]
                assert torch.equal(engine.get_weight(name), want.float()), f"{transport}: {name} differs"
        if tp > 1:
            results += _tp_transfer_bound(source, tp, pp, repeats)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
    finally:
        if engine is not None:
            engine.shutdown()
        dist.destroy_process_group()


def _tp_transfer_bound(source, tp, pp, repeats) -> list[dict]:
    """The transport's limit for the TP part of a sync: every stage's TP peers hand the sender the
    bytes a sync moves over TP (their shards of the split parameters) as one flat buffer, all stages
    at once, by ``torch.distributed.gather`` and by point-to-point sends (what the export uses).
    Wall time between barriers, best of ``repeats`` (+1 warm-up); rows on rank 0."""
    import torch.distributed as dist

    from holderpo_megatron.checkpoint.mapping import export_params

    nbytes = sum(p.local.numel() * p.local.element_size() for p in export_params(source.model, source.arch)
                 if p.mapping.tp_dim is not None)
    tpg = source.tp
    sender = tpg.rank == tpg.dst
    send = torch.ones(nbytes, dtype=torch.uint8)
    recv = [torch.ones(nbytes, dtype=torch.uint8) for _ in range(tp)] if sender else None

    def gather():
        dist.gather(send, recv, dst=tpg.ranks[tpg.dst], group=tpg.group)

    def p2p():
        if sender:
            reqs = [dist.irecv(recv[r], src=tpg.ranks[r], group=tpg.group) for r in range(tp) if r != tpg.rank]
        else:
            reqs = [dist.isend(send, dst=tpg.ranks[tpg.dst], group=tpg.group)]
        for q in reqs:
            q.wait()

    total = torch.tensor([nbytes * (tp - 1) if sender else 0])
    dist.all_reduce(total)  # bytes moved over TP by all stages together
    rows = []
    for kind, fn in (("bare TP gather (dist.gather)", gather), ("bare TP gather (isend/irecv)", p2p)):
        best = float("inf")
        for _ in range(repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            best = min(best, time.perf_counter() - t0)
        if dist.get_rank() == 0:
            rows.append(dict(layout=f"TP{tp}PP{pp}", transport=kind, repeat=0, seconds=best, bytes=int(total),
                             buckets=0, gb_per_s=int(total) / best / 1e9))
            print(f"[tp{tp}pp{pp}] {kind}: {int(total) / 1e9:.3f} GB over TP in {best:.2f} s", flush=True)
    return rows


def _fleet_rank_main(rank, world, store, model_dir, mode, bucket_bytes, repeats, out_path):
    import dataclasses

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=900))
    from holderpo_megatron.rollout import SGLangEngine, SGLangEngineConfig
    from holderpo_megatron.rollout.sglang_launcher import SGLangServerProcess

    key = [os.urandom(16).hex() if rank == 0 else None]  # one API key for the fleet, as a run shares one
    dist.broadcast_object_list(key, src=0)
    cfg = SGLangEngineConfig(model_path=model_dir, dtype="float32", skip_tokenizer_init=True, context_length=256,
                             mem_fraction_static=0.2, api_key=key[0])
    # this replica's engine (the fleet's owner rank)
    server = SGLangServerProcess(cfg.server_args_dict(), api_key=key[0])
    client = None
    try:
        urls: list = [None] * world
        dist.all_gather_object(urls, server.url)
        from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

        enable_cpu_megatron()
        from holderpo_megatron.checkpoint import SafetensorsReader, load_hf_weights_into_model
        from holderpo_megatron.models import ModelArch
        from holderpo_megatron.parallel.layout import ParallelLayout, initialize_model_parallel
        from holderpo_megatron.trainer.actor import MegatronActor
        from holderpo_megatron.weight_sync import MegatronWeightSource, make_weight_synchronizer

        arch = ModelArch.from_pretrained_dir(model_dir)
        initialize_model_parallel(ParallelLayout())
        actor = MegatronActor(arch, ParallelLayout(), optimizer=None)
        load_hf_weights_into_model(actor.unwrapped(), arch, SafetensorsReader(model_dir))
        feeds = mode == "parallel" or rank == 0
        mine = [urls[rank]] if mode == "parallel" else (urls if rank == 0 else [])
        if mine:
            client = SGLangEngine(dataclasses.replace(cfg, mode="servers", server_urls=tuple(mine)))
        sync = make_weight_synchronizer(MegatronWeightSource(actor.unwrapped(), arch, feeds=feeds), client,
                                        dtype=torch.float32, transport="tensor", bucket_bytes=bucket_bytes)
        results = []
        try:
            for r in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                rep = sync.sync(r + 1)
                dist.barrier()  # the fleet's sync ends when its last engine has its weights
                wall = time.perf_counter() - t0
                delivered = torch.tensor([rep.bytes * len(mine) if mine else 0], dtype=torch.float64)
                dist.all_reduce(delivered)
                if rank == 0:
                    results.append(dict(layout=f"fleet of {world}", transport=f"tensor, {mode}", repeat=r,
                                        seconds=wall, bytes=int(delivered), gb_per_s=float(delivered) / wall / 1e9))
                    print(f"[fleet {world} {mode}] #{r}: {wall:.2f} s, {float(delivered) / wall / 1e9:.2f} GB/s "
                          f"into {world} engines", flush=True)
        finally:
            sync.close()
        if client is not None:  # spot check: every engine this rank fed holds Megatron's values
            want = SafetensorsReader(model_dir)["model.norm.weight"].float()
            assert torch.equal(client.get_weight("model.norm.weight"), want)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
    finally:
        if client is not None:
            client.shutdown()
        server.kill()
        dist.destroy_process_group()


def run_fleet(model_dir, n, bucket_bytes, repeats) -> list[dict]:
    import torch.multiprocessing as mp

    rows = []
    for mode in ("parallel", "one owner"):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "results.json")
            mp.spawn(_fleet_rank_main, args=(n, os.path.join(d, "store"), model_dir, mode, bucket_bytes, repeats, out),
                     nprocs=n, join=True)
            with open(out) as f:
                rows += json.load(f)
    return rows


def run_layout(model_dir, tp, pp, transports, bucket_bytes, repeats, nbytes) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "results.json")
        mp.spawn(_rank_main, args=(tp * pp, os.path.join(d, "store"), model_dir, tp, pp, transports, bucket_bytes,
                                   repeats, out, nbytes), nprocs=tp * pp, join=True)
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    ap.add_argument("--layouts", default="1x1,2x2", help="comma-separated TPxPP, e.g. 1x1,2x2")
    ap.add_argument("--transports", default="tensor,tensor-p2p,tensor-packed,distributed,disk",
                    help="tensor (zero-copy on CPU; TP>1: shards read in place from shared memory), tensor-p2p "
                         "(TP>1: shards sent point to point, the GPU path), tensor-packed (flat buckets), "
                         "distributed, disk")
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--fleet", type=int, default=0, help="also N engines fed in parallel vs through one owner")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    transports = args.transports.split(",")
    shown = transports + ["bare TP gather (dist.gather)", "bare TP gather (isend/irecv)"] \
        + (["tensor, parallel", "tensor, one owner"] if args.fleet else [])
    with tempfile.TemporaryDirectory(prefix="holderpo-bench-ws-") as model_dir:
        t0 = time.perf_counter()
        nbytes = save_random_model(model_dir, args.size)
        print(f"random {args.size} model: {nbytes / 1e9:.3f} GB of float32 HF tensors "
              f"({nbytes // 4 / 1e6:.0f}M params), saved in {time.perf_counter() - t0:.1f} s", flush=True)
        start_copy_s = Memcpy(nbytes).seconds(5)  # the fleet's reference (its rows run on every core at once)
        print(f"host memcpy of {nbytes / 1e9:.3f} GB: {start_copy_s:.3f} s = {nbytes / start_copy_s / 1e9:.2f} GB/s "
              f"({os.cpu_count()} threads, at start)", flush=True)
        rows = []
        for lay in args.layouts.split(","):
            if lay == "none":
                continue
            tp, pp = (int(x) for x in lay.lower().split("x"))
            rows += run_layout(model_dir, tp, pp, transports, args.bucket_mb * 1024**2, args.repeats, nbytes)
        if args.fleet:
            rows += run_fleet(model_dir, args.fleet, args.bucket_mb * 1024**2, args.repeats)
    print(f"\n| layout | transport | sync s (best of {args.repeats}) | median warm s | first s | GB/s (best) "
          f"| memcpy GB/s | x memcpy (best) | x memcpy (median warm) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for lay in dict.fromkeys(r["layout"] for r in rows):
        # the layout's reference: the median of the memcpys measured before its syncs (the fleet: at start)
        copies = [r["memcpy_s"] for r in rows if r["layout"] == lay and "memcpy_s" in r]
        copy_s = statistics.median(copies) if copies else start_copy_s
        copy_gbps = nbytes / copy_s / 1e9
        for tr in shown:
            rs = [r for r in rows if r["layout"] == lay and r["transport"] == tr]
            if not rs:
                continue
            best = min(rs, key=lambda r: r["seconds"])
            warm = statistics.median(r["seconds"] for r in rs[1:]) if len(rs) > 1 else best["seconds"]
            # GB/s of a row counts its own bytes (the bare gathers: the bytes moved over TP)
            print(f"| {lay} | {tr} | {best['seconds']:.2f} | {warm:.2f} | {rs[0]['seconds']:.2f} | "
                  f"{best['gb_per_s']:.2f} | {copy_gbps:.2f} | {best['gb_per_s'] / copy_gbps:.2f} | "
                  f"{best['gb_per_s'] * best['seconds'] / warm / copy_gbps:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(size=args.size, bytes=nbytes, memcpy_s_at_start=start_copy_s, rows=rows), f, indent=2)

if __name__ == "__main__":
    main()
