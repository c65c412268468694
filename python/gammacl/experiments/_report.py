"""Tables and plots of the retrieval experiment (gammacl.experiments.retrieval): per-method
summaries (mean +- std over seeds), the printed table, and the recall plots."""

from __future__ import annotations

import numpy as np

from gammacl.experiments._train import fmt_mean_std, mean_std

METRICS = (
    "recall_at_1",
    "recall_at_5",
    "train_recall_at_1",
    "global_train_loss",
    "global_test_loss",
    "global_train_loss_s10",
    "global_test_loss_s10",
    "alignment",
    "uniformity",
    "logit_scale",
)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds at the last evaluated epoch, per (method, batch, scale)."""
    last = max(r["epoch"] for r in rows)
    groups: dict = {}
    for r in rows:
        if r["epoch"] == last:
            groups.setdefault((r["method"], str(r["batch_size"]), r["scale"]), []).append(r)
    out = []
    for (meth, bs, sc), rs in groups.items():
        s = {"method": meth, "batch_size": bs, "scale": sc, "epoch": last, "seeds": len(rs)}
        for k in METRICS:
            s[k + "_mean"], s[k + "_std"] = mean_std(r.get(k) for r in rs)
        out.append(s)
    return out


def format_table(rows: list[dict]) -> str:
    last = max(r["epoch"] for r in rows)
    groups: dict = {}
    for r in rows:
        if r["epoch"] == last:
            groups.setdefault((r["scale"], r["method"], str(r["batch_size"])), []).append(r)
    head = [
        "scale",
        "method",
        "B",
        "test R@1",
        "test R@5",
        "train R@1",
        "G train",
        "G test",
        "G train @10",
        "G test @10",
        "align",
        "unif",
        "scale",
    ]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]

    def order(key):
        sc, meth, bs = key
        return (
            sc != "learnable",
            meth.split(" ")[0],
            bs == "full",
            int(bs) if bs.isdigit() else 0,
            meth,
        )

    for (sc, meth, bs), rs in sorted(groups.items(), key=lambda kv: order(kv[0])):
        cells = [sc, meth, bs] + [
            fmt_mean_std((r.get(k) for r in rs), 3 if k != "logit_scale" else 1) for k in METRICS
        ]
        lines.append(" | ".join(cells))
    return f"epoch {last}, mean±std over seeds\n" + "\n".join(lines)


def plot(rows: list[dict], path: str, smallest: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install gammacl[plot]); no plot written")
        return False
    last = max(r["epoch"] for r in rows)
    scales = sorted({r["scale"] for r in rows})
    fig, axes = plt.subplots(len(scales), 2, figsize=(11, 3.8 * len(scales)), squeeze=False)
    for si, sc in enumerate(scales):
        ax, ax2 = axes[si]
        rs = [r for r in rows if r["scale"] == sc]
        methods = list(dict.fromkeys(r["method"] for r in rs))
        full = [r["recall_at_1"] for r in rs if r["batch_size"] == "full" and r["epoch"] == last]
        for meth in methods:
            mr = [r for r in rs if r["method"] == meth and r["batch_size"] != "full"]
            bss = sorted({r["batch_size"] for r in mr})
            if len(bss) > 1 or (bss and meth == "clip"):
                mean = [
                    mean_std(
                        r["recall_at_1"] for r in mr if r["batch_size"] == b and r["epoch"] == last
                    )
                    for b in bss
                ]
                ax.errorbar(
                    bss,
                    [x[0] for x in mean],
                    yerr=[x[1] for x in mean],
                    label=meth,
                    marker="o",
                    capsize=3,
                )
            er = [r for r in mr if r["batch_size"] == smallest]
            eps = sorted({r["epoch"] for r in er})
            if eps:
                mean = [mean_std(r["recall_at_1"] for r in er if r["epoch"] == e) for e in eps]
                mu = np.array([x[0] for x in mean])
                sd = np.array([x[1] for x in mean])
                ax2.plot(eps, mu, label=meth, marker=".")
                ax2.fill_between(eps, mu - sd, mu + sd, alpha=0.15)
        if full:
            ax.axhline(mean_std(full)[0], color="k", ls="--", lw=0.8, label="clip, full batch")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"test recall@1 at epoch {last}")
        ax.set_title(f"logit_scale {sc}")
        ax.legend(fontsize=7)
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("test recall@1")
        ax2.set_title(f"batch {smallest}, logit_scale {sc}")
        ax2.legend(fontsize=7)
    fig.suptitle("digits left/right halves retrieval (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
