"""Which implementations a bench / profile run covers: gammacl's losses on the requested backends
(gammacl.measure.registry) and the installed peers (gammacl.measure.peers)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from gammacl.measure.cli import IMPL_NAMES, csv_list
from gammacl.measure.peers import peer_impls
from gammacl.measure.registry import Impl, available_backends, our_impls, our_loss_names

FLOORS = ("floor", "floor_gram")  # the yardstick GEMMs' loss column (peers gemm_floor, gemm_gram)


def select_impls(
    args: argparse.Namespace,
    device: torch.device,
    *,
    for_profile: bool,
    default_losses: Sequence[str] | None = None,
) -> tuple[list[Impl], list[str]]:
    """The impls a run covers, from --loss / --backend / --impl, plus human-readable notes on
    what was left out and why."""
    notes: list[str] = []
    requested = set(csv_list(args.impl))
    unknown = requested - set(IMPL_NAMES) - {"all"}
    if unknown:
        raise SystemExit(
            f"--impl: unknown {sorted(unknown)}; choose from {','.join(IMPL_NAMES)} or all"
        )
    losses = set(csv_list(args.loss))
    impls: list[Impl] = []
    if "all" in requested or "gammacl" in requested:
        unavailable: dict[str, str] = {}
        backends = available_backends(device, args.backend, notes, unavailable)
        order = [b for b in csv_list(args.backend) if b in unavailable or b in backends]
        impls += our_impls(order or backends, notes, unavailable)
    impls += peer_impls(device, requested, notes, for_profile=for_profile)
    if "all" not in losses:
        known = set(our_loss_names()) | {"siglip", *FLOORS}
        bad = losses - known
        if bad:
            raise SystemExit(f"--loss: unknown {sorted(bad)}; available: {','.join(sorted(known))}")
        # the GEMM floors go with every loss; the sigmoid-loss peers with gammacl's siglip
        impls = [i for i in impls if i.loss in losses or i.loss in FLOORS]
    elif default_losses is not None:
        impls = [i for i in impls if i.loss in default_losses]
    kept = [i for i in impls if device.type in i.devices]
    return kept, notes
