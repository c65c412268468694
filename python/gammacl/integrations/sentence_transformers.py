"""sentence-transformers losses computed by gammacl's fused op (no B x B score matrix).

One-line swap::

    # from sentence_transformers.losses import MultipleNegativesRankingLoss
    from gammacl.integrations.sentence_transformers import MultipleNegativesRankingLoss

    loss = MultipleNegativesRankingLoss(model)  # the library's constructor and forward

With anchors a_i, candidates c = [positives; negatives_1; ...; negatives_k] (B (1 + k) rows, the
column order of sentence-transformers), s = scale and sim = cos_sim (rows L2-normalised first) or
dot_score:
    query_to_doc  l_i = LSE_j s sim(a_i, c_j) - s sim(a_i, p_i)        (gammacl.infonce_loss)
    doc_to_query  m_i = LSE_j s sim(p_i, a_j) - s sim(p_i, a_i)        (positives vs anchors)
    loss = mean_i l_i                       directions=("query_to_doc",)
         = mean_i (l_i + m_i) / 2           + "doc_to_query", partition_mode="per_direction"
         = mean_i logaddexp(l_i, m_i)       + "doc_to_query", partition_mode="joint"
(joint: one softmax over both rows, log(e^{LSE_q} + e^{LSE_d}) - pos = logaddexp(l_i, m_i)). The
symmetric per-direction loss without hard negatives is one gammacl.clip_loss sweep; every other case
is one infonce sweep per direction, O(B (1 + k) D) memory.

``CachedMultipleNegativesRankingLoss`` (and its Gamma / SogCLR variants) is the library's GradCache
loss with the same constructor: the columns are embedded in mini-batches of ``mini_batch_size``
without grad, the fused loss and its gradient w.r.t. the embeddings are computed over the whole
batch (O(B (1 + k) D) memory: no chunking of the score matrix is needed), then every mini-batch is
embedded again with grad and the cached embedding gradients are back-propagated (the library's own
``CachedLossMixin``, so RNG replay, token budgets and DDP behave as in sentence-transformers 6).

gather_across_devices=True gathers anchors and candidates with sentence-transformers' own
``util.all_gather_with_grad`` and uses its labels (rank * B + i): the same loss and gradients as
the library's.

Gamma / SogCLR (``GammaMultipleNegativesRankingLoss``, ``SogCLRMultipleNegativesRankingLoss``) need
each pair's data-set index; sentence-transformers hands a loss the dataset's "label" column, so add
it once::

    dataset = dataset.add_column("label", list(range(len(dataset))))

The per-sample state lives in buffers of the loss (``loss.gamma``); the trainer does not save a
loss, so pass ``callbacks=[loss.checkpoint_callback()]`` to SentenceTransformerTrainer: it writes
``gammacl_loss_state.pt`` into every ``checkpoint-N`` folder and reloads it on
``trainer.train(resume_from_checkpoint=...)``; ``loss.attach(trainer)`` adds that callback and reads
the state from the very checkpoint ``trainer.train(resume_from_checkpoint=path or True)`` resumes
from (or call ``loss.save_state(dir)`` / ``loss.load_state(dir)`` yourself). The state is updated
only while training (the sentence model in training mode and grad enabled), so
``trainer.evaluate()`` leaves it alone; the loss value is the global-objective estimate
(gammacl.gamma), which the trainer logs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

import gammacl
from gammacl.integrations import require

_EXTRA = "sentence-transformers"
STATE_FILE = "gammacl_loss_state.pt"
SUPPORTED_SIMILARITIES = ("cos_sim", "dot_score")
_DIRECTIONS = (("query_to_doc",), ("query_to_doc", "doc_to_query"))
_ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")


def _st_util():
    return require("sentence_transformers.util", _EXTRA)


def _default_sim():
    return _st_util().cos_sim


def similarity_kind(similarity_fct: Any) -> str:
    """ "cosine" or "dot" for the similarity functions gammacl fuses; ValueError otherwise.

    Accepted: sentence_transformers.util.cos_sim / dot_score, the strings "cosine" / "dot" (or
    SimilarityFunction.COSINE / DOT_PRODUCT), and a model's ``similarity`` method when the model's
    similarity_fn_name is one of those."""
    util = _st_util()
    value = getattr(similarity_fct, "value", similarity_fct)  # SimilarityFunction enum
    if value in ("cosine", "cos_sim") or similarity_fct is util.cos_sim:
        return "cosine"
    if value in ("dot", "dot_product", "dot_score") or similarity_fct is util.dot_score:
        return "dot"
    name = getattr(similarity_fct, "__name__", type(similarity_fct).__name__)
    owner = getattr(similarity_fct, "__self__", None)
    if name == "similarity" and hasattr(owner, "similarity_fn_name"):
        return similarity_kind(owner.similarity_fn_name)
    module = getattr(similarity_fct, "__module__", "") or ""
    if module.startswith("sentence_transformers") and name in SUPPORTED_SIMILARITIES:
        return "cosine" if name == "cos_sim" else "dot"
    raise ValueError(
        f"similarity_fct={name!r} is not fused by gammacl; supported: "
        f"{', '.join('sentence_transformers.util.' + s for s in SUPPORTED_SIMILARITIES)} "
        "(or the strings 'cosine' / 'dot'). Use sentence-transformers' own loss for other "
        "similarities."
    )


def embed(model: nn.Module, sentence_features: Iterable[dict]) -> list[torch.Tensor]:
    """One sentence embedding tensor per input column, as the library's own losses embed them."""
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:  # sentence-transformers < 6: one forward per column
        return [model(f)["sentence_embedding"] for f in sentence_features]
    return embed_columns(model, sentence_features)


def _check_directions(directions: Iterable[str], partition_mode: str) -> tuple[str, ...]:
    """The library's checks (same messages), then the directions gammacl fuses, in its order."""
    directions = tuple(directions)
    if not directions:
        raise ValueError("At least one direction must be specified.")
    if bad := set(directions) - set(_ALL_DIRECTIONS):
        raise ValueError(f"Invalid directions: {bad}. Valid: {set(_ALL_DIRECTIONS)}")
    if "query_to_doc" not in directions:
        raise ValueError("'query_to_doc' direction is required (contains the positive pair).")
    if partition_mode not in ("joint", "per_direction"):
        raise ValueError(
            f"partition_mode must be 'joint' or 'per_direction', got {partition_mode!r}"
        )
    if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
        raise ValueError(
            "partition_mode='per_direction' requires every direction's candidate pool to include "
            "the positive pair; 'query_to_query' and 'doc_to_doc' never do. Use "
            "partition_mode='joint' instead."
        )
    for fused in _DIRECTIONS:
        if set(directions) == set(fused):
            return fused
    raise ValueError(
        f"directions={directions} is not fused by gammacl (query_to_query / doc_to_doc exclude "
        f"self-similarities); supported: {_DIRECTIONS[0]} and {_DIRECTIONS[1]}. Use "
        "sentence-transformers' own loss for the others."
    )


def _check_hardness(mode: str | None, strength: float) -> tuple[str | None, float]:
    if mode not in HARDNESS_MODES:
        raise ValueError(f"hardness_mode must be one of {set(HARDNESS_MODES)}, got {mode!r}")
    if strength < 0.0:
        raise ValueError("hardness_strength must be non-negative.")
    if mode is not None and strength > 0.0:
        raise ValueError(
            f"hardness_mode={mode!r} with hardness_strength={strength} is not fused by gammacl "
            "(it adds hardness_strength * stop_grad(sim) to chosen negative logits); use "
            "sentence-transformers' own loss, or hardness_strength=0.0 (no weighting)."
        )
    return mode, float(strength)


class _EmbeddingLoss(nn.Module):
    """Shared by the losses here: the model, the scale and the similarity prep."""

    def __init__(self, model: nn.Module, scale: float, similarity_fct: Any, backend: str) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.model = model
        self.scale = float(scale)
        self.similarity_fct = _default_sim() if similarity_fct is None else similarity_fct
        self.similarity = similarity_kind(self.similarity_fct)
        self.backend = backend

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        # sentence_transformers.util.normalize_embeddings: F.normalize(p=2, dim=-1, eps=1e-12)
        return torch.nn.functional.normalize(x, p=2, dim=-1) if self.similarity == "cosine" else x

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def forward(self, sentence_features: Iterable[dict[str, torch.Tensor]], labels) -> torch.Tensor:
        return self.compute_loss_from_embeddings(embed(self.model, sentence_features), labels)


class MultipleNegativesRankingLoss(_EmbeddingLoss):
    """sentence-transformers' MultipleNegativesRankingLoss (in-batch negatives + hard-negative
    columns, one direction or symmetric), computed by gammacl without the B x B(1+k) matrix.

    Every keyword of sentence-transformers 6.2's, same defaults: model, scale (= 1 /
    temperature), similarity_fct (cos_sim or dot_score only), gather_across_devices, directions
    (("query_to_doc",) or ("query_to_doc", "doc_to_query"), any order), partition_mode ("joint" or
    "per_direction"), hardness_mode (None or any of the library's modes with
    hardness_strength=0.0, which weights nothing), hardness_strength; keyword-only backend (gammacl
    backend, default "auto"). Values outside the library's raise its ValueError; values it accepts
    that gammacl does not fuse (the query_to_query / doc_to_doc directions, hardness_strength > 0)
    raise a ValueError saying so."""

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        similarity_fct: Callable | None = None,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(model, scale, similarity_fct, backend)
        self.directions = _check_directions(directions, partition_mode)
        self.partition_mode = partition_mode
        self.hardness_mode, self.hardness_strength = _check_hardness(
            hardness_mode, hardness_strength
        )
        self.gather_across_devices = bool(gather_across_devices)

    def compute_loss_from_embeddings(self, embeddings: list[torch.Tensor], labels=None):
        """embeddings[0]: anchors [B, D]; embeddings[1]: positives; embeddings[2:]: hard
        negatives. `labels` is ignored, as in the library."""
        if len(embeddings) < 2:
            raise ValueError(
                f"expected at least 2 embedding columns (anchor, positive[, negatives...]), "
                f"got {len(embeddings)}"
            )
        queries, docs = embeddings[0], list(embeddings[1:])
        b = queries.shape[0]
        offset = 0
        if self.gather_across_devices:  # the library's gather and label offset
            util = _st_util()
            queries = util.all_gather_with_grad(queries)
            docs = [util.all_gather_with_grad(d) for d in docs]
            offset = util.get_rank() * b
        local_q = queries[offset : offset + b]
        local_d = docs[0][offset : offset + b]
        labels_idx = None
        if offset:
            labels_idx = torch.arange(offset, offset + b, device=queries.device)
        symmetric = "doc_to_query" in self.directions
        if symmetric and self.partition_mode == "per_direction" and len(docs) == 1 and not offset:
            if queries.shape[0] == b:  # single process: one sweep gives both directions
                return gammacl.clip_loss(
                    self._prep(local_q), self._prep(local_d), self.scale, backend=self.backend
                )
        candidates = torch.cat(docs, dim=0) if len(docs) > 1 else docs[0]
        reduction = "none" if symmetric and self.partition_mode == "joint" else "mean"

        def infonce(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
            return gammacl.infonce_loss(self._prep(q), self._prep(keys), self.scale,
                                        labels=labels_idx, reduction=reduction,
                                        backend=self.backend)  # fmt: skip

        q2d = infonce(local_q, candidates)
        if not symmetric:
            return q2d
        d2q = infonce(local_d, queries)
        if self.partition_mode == "joint":
            return torch.logaddexp(q2d, d2q).mean()
        return 0.5 * (q2d + d2q)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "similarity_fct": getattr(self.similarity_fct, "__name__", str(self.similarity_fct)),
            "gather_across_devices": self.gather_across_devices,
            "directions": self.directions,
            "partition_mode": self.partition_mode,
            "hardness_mode": self.hardness_mode,
            "hardness_strength": self.hardness_strength,
            "backend": self.backend,
        }


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """sentence-transformers' MultipleNegativesSymmetricRankingLoss (directions query_to_doc +
    doc_to_query, partition_mode="per_direction"; hard-negative columns join the query_to_doc
    candidates, as in the library's current version)."""

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        similarity_fct: Callable | None = None,
        gather_across_devices: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            model,
            scale,
            similarity_fct,
            gather_across_devices,
            directions=("query_to_doc", "doc_to_query"),
            partition_mode="per_direction",
            backend=backend,
        )


class GammaMultipleNegativesRankingLoss(_EmbeddingLoss):
    """gammacl.GammaClipLoss on (anchor, positive) sentence pairs: the symmetric global
    contrastive objective with a per-sample rate state, logit_scale = `scale`.

    The data-set index comes from the dataset's "label" column
    (``dataset.add_column("label", list(range(len(dataset))))``); `num_samples` = len(dataset).
    The state is ``self.gamma`` (a GammaClipLoss; buffers). Keyword arguments after
    similarity_fct go to GammaClipLoss (shape, rate, ema, update, generator, backend, clamp,
    distributed, process_group). A forward updates the state only while training: this loss and
    the sentence model in training mode (the trainer flips the model) and grad enabled; the value
    returned is the global-objective estimate, the gradient the surrogate's (gammacl.gamma)."""

    _impl = gammacl.GammaClipLoss

    def __init__(
        self,
        model: nn.Module,
        num_samples: int,
        scale: float = 20.0,
        similarity_fct: Callable | None = None,
        **loss_kwargs: Any,
    ) -> None:
        super().__init__(model, scale, similarity_fct, loss_kwargs.get("backend", "auto"))
        self.gamma = self._impl(num_samples, **loss_kwargs)

    def compute_loss_from_embeddings(self, embeddings: list[torch.Tensor], labels):
        if len(embeddings) != 2:
            raise ValueError(
                f"{type(self).__name__} takes (anchor, positive) pairs: 2 embedding columns, got "
                f"{len(embeddings)} (hard-negative columns are not part of the gamma objective)"
            )
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
            raise ValueError(
                f"{type(self).__name__} needs each pair's data-set index as the batch's labels; "
                "add a label column: "
                "dataset = dataset.add_column('label', list(range(len(dataset)))) "
                f"(got labels={labels!r})"
            )
        anchors, positives = embeddings
        if anchors.shape[0] < 2 and not _multi_process(self.gamma):
            raise ValueError(
                f"{type(self).__name__} got a batch of {anchors.shape[0]} pair: it needs at least "
                "2 pairs per batch (B - 1 in-batch negatives per anchor). The last batch of an "
                "epoch holds len(dataset) % batch_size pairs: set dataloader_drop_last=True in "
                "SentenceTransformerTrainingArguments."
            )
        self.gamma.train(self.training and getattr(self.model, "training", True))
        return self.gamma(self._prep(anchors), self._prep(positives), self.scale, labels)

    # -- the per-sample state in checkpoints ---------------------------------------------------
    def save_state(self, directory: str | os.PathLike) -> str:
        """Writes the gamma state (log-rates, visit masks, RNG) to
        directory/gammacl_loss_state.pt; returns the file's path."""
        path = os.path.join(os.fspath(directory), STATE_FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(self.gamma.state_dict(), path)
        return path

    def load_state(self, directory: str | os.PathLike) -> None:
        path = os.path.join(os.fspath(directory), STATE_FILE)
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.gamma.load_state_dict(state)

    def checkpoint_callback(self):
        """A transformers TrainerCallback saving the state into each checkpoint-N folder
        (on_save) and calls the loss's set_epoch(epoch) at each epoch's start (the inner-rate
        schedule). Alone, it restores the state at resume from output_dir/checkpoint-N (the
        trainer does not tell callbacks which folder it resumes from); attach(trainer) reads it
        from the checkpoint the trainer resumes from."""
        return _state_callback(self)

    def attach(self, trainer):
        """Adds checkpoint_callback() to `trainer` (once) and wraps this trainer's train() so that
        ``trainer.train(resume_from_checkpoint=path)`` (True: the last checkpoint of output_dir,
        as the trainer resolves it) loads the state from that checkpoint before training.
        Returns the trainer."""
        cb = next((c for c in trainer.callback_handler.callbacks if _is_state_cb(c, self)), None)
        if cb is None:
            cb = self.checkpoint_callback()
            trainer.add_callback(cb)
        train = trainer.train

        def train_resuming(resume_from_checkpoint=None, *args, **kwargs):
            path = resume_from_checkpoint
            if path is True:
                utils = require("transformers.trainer_utils", _EXTRA)
                path = utils.get_last_checkpoint(trainer.args.output_dir)
            if isinstance(path, str | os.PathLike):
                if not os.path.isfile(os.path.join(os.fspath(path), STATE_FILE)):
                    raise FileNotFoundError(
                        f"resuming from {path}, which has no {STATE_FILE}: the gamma state "
                        "cannot be restored (was it saved with loss.checkpoint_callback()?)"
                    )
                self.load_state(path)
                cb.restored = True
            return train(resume_from_checkpoint, *args, **kwargs)

        trainer.train = train_resuming
        return trainer

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "similarity_fct": getattr(self.similarity_fct, "__name__", str(self.similarity_fct)),
            "loss": repr(self.gamma),
        }


class SogCLRMultipleNegativesRankingLoss(GammaMultipleNegativesRankingLoss):
    """gammacl.SogCLRLoss on (anchor, positive) sentence pairs (keyword arguments: ema, update,
    backend, clamp, distributed, process_group); index from the "label" column as in
    GammaMultipleNegativesRankingLoss."""

    _impl = gammacl.SogCLRLoss


def _multi_process(loss: nn.Module) -> bool:
    import torch.distributed as dist

    up = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return up and loss.distributed is not False


def _is_state_cb(cb, loss) -> bool:
    return getattr(cb, "loss", None) is loss


def _state_callback(loss: GammaMultipleNegativesRankingLoss):
    trainer_callback = require("transformers.trainer_callback", "sentence-transformers")
    prefix = require("transformers.trainer_utils", "sentence-transformers").PREFIX_CHECKPOINT_DIR

    class GammaLossStateCallback(trainer_callback.TrainerCallback):
        """Saves / restores a gammacl loss's per-sample state with the trainer's checkpoints."""

        def __init__(self) -> None:
            self.loss = loss
            self.restored = False  # set by loss.attach(trainer) once it loaded the state

        def _dir(self, args, state) -> str:
            return os.path.join(args.output_dir, f"{prefix}-{state.global_step}")

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                loss.save_state(self._dir(args, state))

        def on_epoch_begin(self, args, state, control, **kwargs):
            loss.gamma.set_epoch(int(state.epoch or 0))  # epochs completed (a float)

        def on_train_begin(self, args, state, control, **kwargs):
            restored, self.restored = self.restored, False
            if state.global_step == 0 or restored:
                return
            folder = self._dir(args, state)
            if os.path.isfile(os.path.join(folder, STATE_FILE)):
                loss.load_state(folder)
                warnings.warn(
                    f"resuming at step {state.global_step}: the gamma state was read from "
                    f"{folder}, which need not be the checkpoint the trainer resumed from; "
                    "loss.attach(trainer) reads the one it resumes from",
                    stacklevel=2,
                )
            else:
                warnings.warn(
                    f"resuming at step {state.global_step} but {folder} has no {STATE_FILE}; "
                    "the gamma state was not restored (loss.attach(trainer) reads it from the "
                    "checkpoint the trainer resumes from; or call loss.load_state(checkpoint_dir))",
                    stacklevel=2,
                )

    return GammaLossStateCallback()


# -- GradCache losses, defined on first access on sentence-transformers' CachedLossMixin --
_CACHED_NAMES = (
    "CachedMultipleNegativesRankingLoss",
    "CachedGammaMultipleNegativesRankingLoss",
    "CachedSogCLRMultipleNegativesRankingLoss",
)


def _cached_init(loss, model, mini_batch_size, mini_batch_num_tokens, show_progress_bar) -> None:
    gradcache = require("sentence_transformers.base.losses.gradcache", _EXTRA)
    if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int):
        raise TypeError(f"mini_batch_size must be an int, got {mini_batch_size!r}")
    if mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
    if mini_batch_num_tokens is not None and mini_batch_num_tokens <= 0:
        raise ValueError("mini_batch_num_tokens must be a positive integer or None.")
    if gradcache.has_static_embedding_input(model):
        raise ValueError(
            f"{type(loss).__name__} is not compatible with a StaticEmbedding model, whose inputs "
            "cannot be split into mini-batches; use the non-cached loss instead."
        )
    loss.mini_batch_size = mini_batch_size
    loss.mini_batch_num_tokens = mini_batch_num_tokens
    loss.show_progress_bar = bool(show_progress_bar)


def _define_cached() -> None:
    gradcache = require("sentence_transformers.base.losses.gradcache", _EXTRA)

    class _GradCache(gradcache.CachedLossMixin):
        """forward = the library's GradCache pass; calculate_loss = the fused loss of the whole
        batch from the cached embeddings (and its backward to them)."""

        def forward(self, sentence_features: Iterable[dict], labels=None) -> torch.Tensor:
            sentence_features = list(sentence_features)
            if len(sentence_features) < 2:
                raise ValueError(f"Expected at least 2 inputs, got {len(sentence_features)}")
            return self.forward_cached(sentence_features, labels)

        def calculate_loss(self, reps, labels=None, *, with_backward: bool = False):
            loss = self.compute_loss_from_embeddings([torch.cat(r) for r in reps], labels)
            if with_backward:
                loss.backward()
                loss = loss.detach()
            return loss

        def get_config_dict(self) -> dict[str, Any]:
            return {
                **super().get_config_dict(),
                "mini_batch_size": self.mini_batch_size,
                "mini_batch_num_tokens": self.mini_batch_num_tokens,
            }

    class CachedMultipleNegativesRankingLoss(_GradCache, MultipleNegativesRankingLoss):
        """sentence-transformers' CachedMultipleNegativesRankingLoss (GradCache) on gammacl's
        fused MultipleNegativesRankingLoss: the library's constructor (every keyword, same
        order and defaults; values as MultipleNegativesRankingLoss accepts them) plus
        keyword-only backend. Same loss and parameter gradients as the library's at any
        mini_batch_size (module docstring)."""

        def __init__(
            self,
            model: nn.Module,
            scale: float = 20.0,
            similarity_fct: Callable | None = None,
            mini_batch_size: int = 32,
            mini_batch_num_tokens: int | None = None,
            gather_across_devices: bool = False,
            directions: tuple[str, ...] = ("query_to_doc",),
            partition_mode: str = "joint",
            show_progress_bar: bool = False,
            hardness_mode: str | None = None,
            hardness_strength: float = 0.0,
            *,
            backend: str = "auto",
        ) -> None:
            super().__init__(
                model,
                scale,
                similarity_fct,
                gather_across_devices,
                directions,
                partition_mode,
                hardness_mode,
                hardness_strength,
                backend=backend,
            )
            _cached_init(self, model, mini_batch_size, mini_batch_num_tokens, show_progress_bar)

    class CachedGammaMultipleNegativesRankingLoss(_GradCache, GammaMultipleNegativesRankingLoss):
        """GammaMultipleNegativesRankingLoss under GradCache: (model, num_samples, scale,
        similarity_fct, mini_batch_size, mini_batch_num_tokens, show_progress_bar, **the
        GammaClipLoss keywords). The state is updated once per batch (in the loss pass)."""

        def __init__(
            self,
            model: nn.Module,
            num_samples: int,
            scale: float = 20.0,
            similarity_fct: Callable | None = None,
            mini_batch_size: int = 32,
            mini_batch_num_tokens: int | None = None,
            show_progress_bar: bool = False,
            **loss_kwargs: Any,
        ) -> None:
            super().__init__(model, num_samples, scale, similarity_fct, **loss_kwargs)
            _cached_init(self, model, mini_batch_size, mini_batch_num_tokens, show_progress_bar)

    class CachedSogCLRMultipleNegativesRankingLoss(CachedGammaMultipleNegativesRankingLoss):
        """SogCLRMultipleNegativesRankingLoss under GradCache (see the Gamma variant)."""

        _impl = gammacl.SogCLRLoss

    for cls in (
        CachedMultipleNegativesRankingLoss,
        CachedGammaMultipleNegativesRankingLoss,
        CachedSogCLRMultipleNegativesRankingLoss,
    ):
        cls.__qualname__ = cls.__name__
        globals()[cls.__name__] = cls


def __getattr__(name: str):
    if name in _CACHED_NAMES:  # needs sentence-transformers >= 6 (its gradcache module)
        _define_cached()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_CACHED_NAMES,
    "GammaMultipleNegativesRankingLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "STATE_FILE",
    "SogCLRMultipleNegativesRankingLoss",
    "embed",
    "similarity_kind",
]
