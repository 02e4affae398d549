"""DistributedDataParallel on CPU (gloo), two processes on 127.0.0.1.

One spawn runs both checks: (1) after one DDP step with gradient accumulation, every rank's
gradients equal the single-process gradients of the same global batch; (2) the trainer itself
under two ranks: rank 0 alone writes files, the ranks sample different batches, and their
weights stay identical.
"""

import contextlib
import io
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minigpt.ddp import (
    any_rank,
    gather,
    init_distributed,
    mean_over_ranks,
    resolve_device,
    sync_gradients,
    wrap_model,
)
from minigpt.model import GPT, GPTConfig
from minigpt.train import TrainConfig, accumulate_gradients, train

WORLD = 2


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16))


def _global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 13, (8, 8), generator=g), torch.randint(0, 13, (8, 8), generator=g)


def _worker(rank: int, port: int, tmp: str, text: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MINIGPT_CACHE_DIR=os.path.join(tmp, f"cache{rank}"))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size) == (rank, WORLD)
    # (1) this rank's half of the global batch, in two micro-batches
    x, y = _global_batch()
    xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
    net = wrap_model(_model(), info)
    accumulate_gradients(net, [(xs[:2], ys[:2]), (xs[2:], ys[2:])], "float32")
    grads = {n: p.grad for n, p in net.module.named_parameters()}
    try:  # micro-batches in threads cannot drive DDP's hooks: refused, nothing touched
        accumulate_gradients(net, [(xs[:2], ys[:2]), (xs[2:], ys[2:])], "float32", threads=2)
        refused = ""
    except ValueError as e:
        refused = str(e)
    # (2) the trainer under DDP
    out = os.path.join(tmp, f"run{rank}")  # a different out_dir per rank: only rank 0 writes
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        res = train(TrainConfig(dataset=text, n_layer=1, n_head=2, n_embd=16, block_size=8,
                                batch_size=4, max_iters=3, eval_interval=3, eval_iters=1,
                                warmup_iters=1, out_dir=out, progress=True, device="cpu"))
    torch.save({"grads": grads, "refused": refused,
                "state": res.model.state_dict(), "losses": res.losses,
                "wrote": os.path.isdir(out), "printed": printed.getvalue()},
               os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    text = tmp / "text.txt"
    text.write_text("all the world's a stage, and all the men and women merely players\n" * 40)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp), str(text)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.slow
def test_ddp_gradients_equal_single_process(ranks):
    model = _model()
    accumulate_gradients(model, [_global_batch()], "float32")
    for r in ranks:
        for name, p in model.named_parameters():
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_concurrent_micro_batches_refuse_a_ddp_model(ranks):
    assert all("threads=1 under torchrun" in r["refused"] for r in ranks)


@pytest.mark.slow
def test_trainer_under_ddp(ranks):
    assert ranks[0]["wrote"] and not ranks[1]["wrote"]
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), k  # weights stay in sync
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the logged loss is the all-rank mean


@pytest.mark.slow
def test_only_rank_0_prints_the_validation_loss(ranks):
    lines = ranks[0]["printed"].splitlines()
    assert [ln.split(":")[0] for ln in lines if "val loss" in ln] == ["step 0", "step 3"]
    assert ranks[1]["printed"] == ""


def test_single_process_helpers_change_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.main, info.owns_group) == (0, 1, True, False)
    model, t = _model(), torch.tensor([2.0])
    assert wrap_model(model, info) is model
    assert mean_over_ranks(t, info) is t and gather(t, info) == [t]
    assert any_rank(True, info) and not any_rank(False, info)
    assert isinstance(sync_gradients(model, sync=False), contextlib.nullcontext)


@pytest.mark.parametrize("device, message", [
    ("tpu", "is not a device"), ("cuda:x", "is not a device"), ("xla", "is not supported"),
    pytest.param("cuda", "CUDA is not available", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a GPU is present")),
])
def test_bad_devices_are_rejected_with_one_line(device, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(device)
