"""Train a small two-tower model on synthetic paired data with gammacl's ClipLoss or GammaClipLoss.

    python examples/train_clip.py --steps 200                              # one process
    torchrun --nproc_per_node=2 examples/train_clip.py --steps 200     # gloo on CPU, NCCL on GPU
    torchrun --nproc_per_node=2 examples/train_clip.py --loss gamma

Data: shared latents z ~ N(0, I_k) per dataset index; the "image" is z A + noise and the "text"
z B + noise with fixed random A, B, so the pair is recoverable only through z. Each step draws one
global batch of world_size * batch_size indices (the same draw on every rank) and every rank
takes its slice, as a DistributedSampler with drop_last=True would. The model is two MLP towers,
L2-normalised outputs and a learnable log logit-scale clamped to log(100) after every step
(open_clip's recipe); with several processes it is wrapped in DDP and the loss is open_clip's
recommended local_loss + gather_with_grad, which gives the global-batch gradient. Printed: the
loss (averaged over ranks; for --loss gamma the loss's estimate of its objective, since the value
it backpropagates is a random surrogate) and image->text recall@1 on a held-out synthetic set.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

import gammacl


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", choices=("clip", "gamma"), default="clip")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64, help="pairs per process and step")
    p.add_argument("--dim", type=int, default=32, help="embedding dimension")
    p.add_argument("--latent", type=int, default=8, help="dimension of the shared latent")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=4096, help="training set size")
    p.add_argument("--eval-size", type=int, default=256, help="held-out pairs for recall@1")
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--backend", default="auto", choices=gammacl.BACKENDS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--gamma-shape", type=float, default=1.0, help="GammaClipLoss shape")
    p.add_argument("--json", action="store_true", help="print a final RESULT {json} line")
    return p.parse_args(argv)


class SyntheticPairs:
    """x_i = z_i A + noise (image view), y_i = z_i B + noise (text view); index i -> (x_i, y_i)."""

    def __init__(
        self, num: int, latent: int, noise: float, seed: int, img_dim: int = 48, txt_dim: int = 32
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        mix = torch.Generator().manual_seed(12345)  # same towers' inputs for train and eval
        a = torch.randn(latent, img_dim, generator=mix) / math.sqrt(latent)
        b = torch.randn(latent, txt_dim, generator=mix) / math.sqrt(latent)
        z = torch.randn(num, latent, generator=g)
        self.image = z @ a + noise * torch.randn(num, img_dim, generator=g)
        self.text = z @ b + noise * torch.randn(num, txt_dim, generator=g)

    def __len__(self) -> int:
        return self.image.shape[0]


class TwoTower(nn.Module):
    def __init__(self, img_dim: int, txt_dim: int, hidden: int, dim: int) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(img_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.text = nn.Sequential(nn.Linear(txt_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict:
        return {
            "image_features": F.normalize(self.image(image), dim=-1),
            "text_features": F.normalize(self.text(text), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }


@torch.no_grad()
def recall_at_1(model: TwoTower, data: SyntheticPairs, device: torch.device) -> float:
    """Image -> text recall@1 over the held-out set (every text is a candidate)."""
    out = model(data.image.to(device), data.text.to(device))
    sim = out["image_features"] @ out["text_features"].T
    hit = sim.argmax(dim=1) == torch.arange(sim.shape[0], device=device)
    return float(hit.float().mean())


def setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import torch.distributed as dist

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def train(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts them)
    data = SyntheticPairs(args.num_samples, args.latent, args.noise, seed=args.seed)
    held_out = SyntheticPairs(args.eval_size, args.latent, args.noise, seed=args.seed + 1)
    model = TwoTower(data.image.shape[1], data.text.shape[1], args.hidden, args.dim).to(device)
    net: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.loss == "clip":
        loss_fn = gammacl.ClipLoss(
            local_loss=True,
            gather_with_grad=True,
            rank=rank,
            world_size=world,
            backend=args.backend,
        )
    else:
        # per-sample state on `device`, indexed by the global data-set index; under torchrun it
        # is gathered and updated identically on every rank, with rank 0's Gamma draws
        loss_fn = gammacl.GammaClipLoss(
            len(data),
            shape=args.gamma_shape,
            backend=args.backend,
            generator=torch.Generator().manual_seed(args.seed),
        )
        loss_fn = loss_fn.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    global_batch = world * args.batch_size
    if global_batch > len(data):
        raise ValueError(
            f"world_size * batch_size = {global_batch} exceeds --num-samples {len(data)}"
        )
    order_gen = torch.Generator().manual_seed(args.seed + 2)  # identical on every rank
    recall_before = recall_at_1(model, held_out, device)
    losses = []
    if rank == 0:
        print(
            f"world_size={world} device={device} loss={args.loss} "
            f"global_batch={global_batch} recall@1 (i->t) before: {recall_before:.3f}",
            flush=True,
        )
    for step in range(1, args.steps + 1):
        index = torch.randperm(len(data), generator=order_gen)[:global_batch]
        index = index[rank * args.batch_size : (rank + 1) * args.batch_size]
        out = net(data.image[index].to(device), data.text[index].to(device))
        if args.loss == "clip":
            loss = loss_fn(**out)
        else:
            loss = loss_fn(**out, index=index.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        # the gamma loss value is a random surrogate (its gradient is what matters); show its
        # estimate of the objective instead: 1/2 mean(-l_ii + log R_i) + (text side)
        shown = (loss if args.loss == "clip" else loss_fn.global_loss_estimate).detach().clone()
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(shown)
            shown /= world
        losses.append(float(shown))
        if rank == 0 and (step % args.log_every == 0 or step in (1, args.steps)):
            print(
                f"step {step:5d}  loss {losses[-1]:.4f}  "
                f"logit_scale {float(model.logit_scale.detach().exp()):.2f}",
                flush=True,
            )
    recall_after = recall_at_1(model, held_out, device)
    k = max(1, min(10, len(losses) // 5))
    result = {
        "world_size": world,
        "loss": args.loss,
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "recall_before": recall_before,
        "recall_after": recall_after,
        "chance": 1.0 / args.eval_size,
    }
    if rank == 0:
        print(
            f"recall@1 (i->t) on {args.eval_size} held-out pairs: {recall_before:.3f} -> "
            f"{recall_after:.3f} (chance {1.0 / args.eval_size:.3f})",
            flush=True,
        )
        if args.json:
            print("RESULT " + json.dumps(result), flush=True)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    try:
        # train() returns before the process group goes: the DDP reducer it owns must be freed
        # first (freeing it after destroy_process_group intermittently hung gloo at exit).
        return train(args, rank, world, device)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    main()
