"""gammacl.integrations.sentence_transformers against the real sentence-transformers losses, on a
tiny BERT built from a config with a locally built tokenizer (no hub access).

Parity rule (tests/tolerances.py): the library's own loss on the float64 copy of the model is the
reference; our fp32 loss and every parameter gradient must be within 2x the library's own fp32
error + TOL; in float64 they must match the library tightly."""

import copy
import math
import os
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_dtype, assert_close_fp64

os.environ.setdefault("HF_HUB_OFFLINE", "1")
st = pytest.importorskip(
    "sentence_transformers",
    reason="optional dependency: pip install 'gammacl[sentence-transformers]'",
)
try:  # noqa: E402
    from sentence_transformers.sentence_transformer import losses as st_losses
except ImportError:  # sentence-transformers < 6
    from sentence_transformers import losses as st_losses
from sentence_transformers import util as st_util  # noqa: E402

from gammacl.integrations import sentence_transformers as G  # noqa: E402

WORDS = (
    "the a cat dog sat on mat ran fast slow red blue green big small house car tree bird "
    "sang sky river flows"
).split()
SENTENCES = [
    "the cat sat on the mat",
    "a dog ran fast",
    "red car",
    "the big house on the river",
    "a small bird sang",
    "blue sky",
    "green tree on a hill",
    "the river flows slow",
    "a red bird",
    "the dog sat",
    "big blue car ran",
    "small cat",
]


def make_model(tmp_path, seed=0):
    """A 1-layer, 16-wide BERT sentence encoder (mean pooling), saved in tmp_path and loaded
    through sentence-transformers' Transformer module."""
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    path = str(tmp_path / f"tiny-bert-{seed}")
    BertModel(cfg).save_pretrained(path)
    BertTokenizerFast(vocab=vocab).save_pretrained(path)
    tr = Transformer(path, max_seq_length=16)
    return SentenceTransformer(modules=[tr, Pooling(16, "mean")], device="cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("st"))


def _features(model, columns):
    return [dict(model.tokenize(col)) for col in columns]


def _columns(n_neg, b=5):
    cols = [SENTENCES[:b], SENTENCES[b : 2 * b]]
    for k in range(n_neg):
        cols.append([SENTENCES[(2 * b + k + 3 * i) % len(SENTENCES)] for i in range(b)])
    return cols


def _loss_and_grads(loss_fn, model, feats, labels=None):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(feats, labels)
    loss.backward()
    grads = {
        n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()
    }
    return loss.detach(), grads


def _compare(tiny, make_theirs, make_ours, columns, labels=None):
    m32 = copy.deepcopy(tiny).float()
    m64 = copy.deepcopy(tiny).double()
    ours32 = copy.deepcopy(tiny).float()
    ours64 = copy.deepcopy(tiny).double()
    feats = _features(m32, columns)
    ref, ref_g = _loss_and_grads(make_theirs(m64), m64, feats, labels)
    lib, lib_g = _loss_and_grads(make_theirs(m32), m32, feats, labels)
    out, out_g = _loss_and_grads(make_ours(ours32), ours32, feats, labels)
    out64, out64_g = _loss_and_grads(make_ours(ours64), ours64, feats, labels)
    assert out.dtype == torch.float32
    assert_close_dtype(out.reshape(1), ref.reshape(1), lib.reshape(1), torch.float32, "loss")
    assert_close_fp64(out64, ref, "loss fp64")
    assert ref_g.keys() == out_g.keys()
    n_checked = 0
    for name, g in ref_g.items():
        assert (g is None) == (out_g[name] is None), name
        if g is None:
            continue
        assert_close_dtype(out_g[name], g, lib_g[name], torch.float32, name)
        assert_close_fp64(out64_g[name], g, f"{name} fp64")
        n_checked += 1
    assert n_checked >= 10  # every BERT weight that gets a gradient was compared
    return ref


# The default run keeps the hard-negative cases; the rest run in CI's slow step (tiny models, but
# each case runs four forward/backward passes of BERT).
SLOW = pytest.mark.slow


@pytest.mark.parametrize("n_neg", [pytest.param(0, marks=SLOW), 2])
@pytest.mark.parametrize("sim", ["cos_sim", "dot_score"])
def test_mnrl_matches_library(tiny, n_neg, sim):
    fct = getattr(st_util, sim)
    scale = 20.0 if sim == "cos_sim" else 0.5
    _compare(
        tiny,
        lambda m: st_losses.MultipleNegativesRankingLoss(m, scale=scale, similarity_fct=fct),
        lambda m: G.MultipleNegativesRankingLoss(
            m, scale=scale, similarity_fct=fct, backend="torch"
        ),
        _columns(n_neg),
    )


@pytest.mark.parametrize("n_neg", [pytest.param(0, marks=SLOW), 1])
@pytest.mark.parametrize("partition_mode", ["per_direction", "joint"])
def test_symmetric_matches_library(tiny, n_neg, partition_mode):
    directions = ("query_to_doc", "doc_to_query")
    _compare(
        tiny,
        lambda m: st_losses.MultipleNegativesRankingLoss(
            m, scale=7.0, directions=directions, partition_mode=partition_mode
        ),
        lambda m: G.MultipleNegativesRankingLoss(
            m, scale=7.0, directions=directions, partition_mode=partition_mode, backend="torch"
        ),
        _columns(n_neg),
    )


@pytest.mark.slow
def test_symmetric_class_matches_library_class(tiny):
    theirs = getattr(st_losses, "MultipleNegativesSymmetricRankingLoss", None)
    if theirs is None:
        pytest.skip("this sentence-transformers has no MultipleNegativesSymmetricRankingLoss")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated in sentence-transformers 6
        _compare(
            tiny,
            lambda m: theirs(m, scale=11.0),
            lambda m: G.MultipleNegativesSymmetricRankingLoss(m, scale=11.0, backend="torch"),
            _columns(1),
        )


@pytest.mark.slow
def test_gather_across_devices_single_process(tiny):
    """Not distributed: the library's gather returns the local tensor (offset 0), ours too."""
    _compare(
        tiny,
        lambda m: st_losses.MultipleNegativesRankingLoss(m, gather_across_devices=True),
        lambda m: G.MultipleNegativesRankingLoss(m, gather_across_devices=True, backend="torch"),
        _columns(1),
    )


def test_gather_offset_labels_match_library_formula(monkeypatch):
    """A fake 2-rank gather (rank 1): anchors/candidates 'gathered' from two ranks, labels offset
    by rank * B, compared with the library's own compute_loss_from_embeddings under the same
    fake gather."""
    b, d = 4, 8
    other = [torch.randn(b, d, dtype=torch.float64) for _ in range(3)]

    def fake_gather(x):
        k = fake_gather.calls % 3
        fake_gather.calls += 1
        return torch.cat([other[k], x], dim=0)  # rank 1 of 2

    monkeypatch.setattr(st_util, "all_gather_with_grad", fake_gather)
    monkeypatch.setattr(st_util, "get_rank", lambda: 1)
    import sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking as mod

    monkeypatch.setattr(mod, "all_gather_with_grad", fake_gather)
    monkeypatch.setattr(mod, "get_rank", lambda: 1)
    embs = [torch.randn(b, d, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    for directions, mode in [
        (("query_to_doc",), "joint"),
        (("query_to_doc", "doc_to_query"), "per_direction"),
        (("query_to_doc", "doc_to_query"), "joint"),
    ]:
        fake_gather.calls = 0
        ref = st_losses.MultipleNegativesRankingLoss(
            None, 5.0, gather_across_devices=True, directions=directions, partition_mode=mode
        ).compute_loss_from_embeddings(embs, None)
        ref_g = torch.autograd.grad(ref, embs)
        fake_gather.calls = 0
        out = G.MultipleNegativesRankingLoss(
            None,
            5.0,
            gather_across_devices=True,
            directions=directions,
            partition_mode=mode,
            backend="torch",
        ).compute_loss_from_embeddings(embs, None)
        out_g = torch.autograd.grad(out, embs)
        assert_close_fp64(out, ref, f"{directions} {mode}")
        for x, y in zip(out_g, ref_g):
            assert_close_fp64(x, y, f"grad {directions} {mode}")


def test_unsupported_similarity_and_directions_raise():
    with pytest.raises(ValueError, match="cos_sim.*dot_score"):
        G.MultipleNegativesRankingLoss(None, similarity_fct=st_util.euclidean_sim)
    with pytest.raises(ValueError, match="not fused"):
        G.MultipleNegativesRankingLoss(None, similarity_fct=lambda a, b: a @ b.T)
    with pytest.raises(ValueError, match="query_to_doc"):
        G.MultipleNegativesRankingLoss(None, directions=("query_to_doc", "query_to_query"))
    with pytest.raises(ValueError, match="scale"):
        G.MultipleNegativesRankingLoss(None, scale=0.0)
    assert G.similarity_kind("cosine") == "cosine"
    assert G.similarity_kind(st_util.dot_score) == "dot"


def test_gamma_loss_uses_label_index_and_matches_gammaclip(tiny):
    """GammaMultipleNegativesRankingLoss == gammacl.GammaClipLoss on the normalised embeddings
    with the label column as index; its state is in the loss's buffers."""
    import gammacl

    model = copy.deepcopy(tiny).double()
    cols = _columns(0, b=6)
    feats = _features(model, cols)
    index = torch.tensor([7, 3, 11, 0, 5, 9])
    g = torch.Generator().manual_seed(3)
    loss_fn = G.GammaMultipleNegativesRankingLoss(
        model, num_samples=12, scale=10.0, generator=g, backend="torch"
    )
    out = loss_fn(feats, index)
    with torch.no_grad():
        a, p = (F.normalize(model(f)["sentence_embedding"], dim=-1) for f in feats)
    ref_fn = gammacl.GammaClipLoss(12, generator=torch.Generator().manual_seed(3), backend="torch")
    ref = ref_fn(a, p, 10.0, index)
    assert_close_fp64(out.detach(), ref, "gamma loss")
    sd = loss_fn.state_dict()
    assert torch.equal(sd["gamma.image_rate.visited"], ref_fn.image_rate.visited)
    assert sd["gamma.image_rate.visited"][index].all() and sd["gamma.image_rate.visited"].sum() == 6
    assert_close_fp64(sd["gamma.image_rate.log_rate"], ref_fn.image_rate.log_rate, "state")
    with pytest.raises(ValueError, match="add_column"):
        loss_fn(feats, None)
    with pytest.raises(ValueError, match="pairs"):
        loss_fn(_features(model, _columns(1, b=6)), index)


@pytest.mark.slow
def test_gamma_loss_trains_with_sentence_transformer_trainer(tmp_path):
    """A few steps of SentenceTransformerTrainer with GammaMultipleNegativesRankingLoss (index from
    the label column); the per-sample state is written into each checkpoint folder, and a run
    resumed from checkpoint-2 restores it and ends where the uninterrupted run ended."""
    datasets = pytest.importorskip("datasets", reason="optional dependency datasets")
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    n = 8
    ds = datasets.Dataset.from_dict({"anchor": SENTENCES[:n], "positive": SENTENCES[2 : 2 + n]})
    ds = ds.add_column("label", list(range(n)))

    def run(out_dir, resume=None, eval_ds=None):
        model = make_model(tmp_path, seed=0)
        loss = G.GammaMultipleNegativesRankingLoss(
            model, num_samples=n, scale=10.0, generator=torch.Generator().manual_seed(0)
        )
        args = SentenceTransformerTrainingArguments(
            output_dir=str(out_dir),
            per_device_train_batch_size=4,
            per_device_eval_batch_size=4,  # dataloader_drop_last drops a short eval batch too
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            logging_steps=1,
            learning_rate=5e-3,
            seed=0,
            report_to=[],
            use_cpu=True,
            dataloader_drop_last=True,
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=ds, eval_dataset=eval_ds, loss=loss
        )
        loss.attach(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return model, loss, trainer

    init = {k: v.clone() for k, v in make_model(tmp_path, seed=0).state_dict().items()}
    out = tmp_path / "run"
    eval_ds = datasets.Dataset.from_dict(
        {"anchor": SENTENCES[8:12], "positive": SENTENCES[:4], "label": [0, 1, 2, 3]}
    )
    model, loss, trainer = run(out, eval_ds=eval_ds)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    kept = {k: v.clone() for k, v in loss.gamma.state_dict().items() if torch.is_tensor(v)}
    metrics = trainer.evaluate()  # its labels are not training indices: no state change
    assert math.isfinite(metrics["eval_loss"])
    for k, v in kept.items():
        assert torch.equal(loss.gamma.state_dict()[k], v), k
    assert any(not torch.equal(v, init[k]) for k, v in model.state_dict().items())  # it trained
    state = loss.gamma.state_dict()
    assert state["image_rate.visited"].all() and state["text_rate.visited"].all()
    for step in (2, 4):
        saved = torch.load(out / f"checkpoint-{step}" / G.STATE_FILE, weights_only=True)
        assert saved["image_rate.visited"].sum() == n  # one epoch = 2 steps of 4 covers all 8
        if step == 4:
            for k in ("image_rate.log_rate", "text_rate.log_rate"):
                assert torch.equal(saved[k], state[k])
    ck2 = torch.load(out / "checkpoint-2" / G.STATE_FILE, weights_only=True)
    assert not torch.equal(ck2["image_rate.log_rate"], state["image_rate.log_rate"])

    # resume from a copy of checkpoint-2 elsewhere, into a new output folder: attach() reads the
    # state from the folder the trainer resumes from
    shutil.copytree(out / "checkpoint-2", tmp_path / "moved" / "checkpoint-2")
    shutil.rmtree(out)
    resumed_model, resumed, _ = run(
        tmp_path / "run2", resume=str(tmp_path / "moved" / "checkpoint-2")
    )
    res_state = resumed.gamma.state_dict()
    assert torch.equal(res_state["image_rate.visited"], state["image_rate.visited"])
    for k in ("image_rate.log_rate", "text_rate.log_rate"):
        torch.testing.assert_close(res_state[k], state[k], rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_state_callback_restores_state_on_resume(tmp_path, tiny):
    """The callback alone: on_save writes checkpoint-N/gammacl_loss_state.pt, on_train_begin at
    step N loads it into a fresh loss (and warns when the file is missing)."""
    from types import SimpleNamespace

    loss = G.SogCLRMultipleNegativesRankingLoss(tiny, num_samples=6, backend="torch")
    feats = _features(tiny, _columns(0, b=3))
    loss(feats, torch.tensor([4, 0, 2]))  # a training forward (outside training: no update)
    cb = loss.checkpoint_callback()
    args = SimpleNamespace(output_dir=str(tmp_path))
    cb.on_save(args, SimpleNamespace(global_step=3, is_world_process_zero=True), None)
    assert (tmp_path / "checkpoint-3" / G.STATE_FILE).is_file()
    fresh = G.SogCLRMultipleNegativesRankingLoss(tiny, num_samples=6, backend="torch")
    with pytest.warns(UserWarning, match="need not be the checkpoint"):  # output_dir guessed
        fresh.checkpoint_callback().on_train_begin(args, SimpleNamespace(global_step=3), None)
    for k, v in loss.gamma.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(fresh.gamma.state_dict()[k], v), k
    assert fresh.gamma.image_rate.visited.tolist() == [1, 0, 1, 0, 1, 0]
    with pytest.warns(UserWarning, match="not restored.*attach"):
        fresh.checkpoint_callback().on_train_begin(args, SimpleNamespace(global_step=5), None)


def _ours_and_theirs_signature(ours, theirs):
    import inspect

    mine = inspect.signature(ours.__init__).parameters
    lib = inspect.signature(theirs.__init__).parameters
    return mine, lib


@pytest.mark.parametrize("cached", [False, True])
def test_every_library_keyword_is_accepted_with_its_default(tiny, cached):
    """Every parameter of sentence-transformers' (Cached)MultipleNegativesRankingLoss is ours too,
    in the same position, with the same default (similarity_fct: None resolves to cos_sim);
    passing each default explicitly builds the same loss."""
    name = "CachedMultipleNegativesRankingLoss" if cached else "MultipleNegativesRankingLoss"
    theirs, ours = getattr(st_losses, name), getattr(G, name)
    mine, lib = _ours_and_theirs_signature(ours, theirs)
    assert list(mine)[: len(lib)] == list(lib)  # same names, same order
    defaults = {}
    for key, p in lib.items():
        if key in ("self", "model"):
            continue
        if key == "similarity_fct":
            assert mine[key].default is None and p.default is st_util.cos_sim
        else:
            assert mine[key].default == p.default, key
        defaults[key] = p.default
    assert {"hardness_mode", "hardness_strength"} <= set(defaults)
    loss = ours(tiny, **defaults)
    assert loss.similarity_fct is st_util.cos_sim and loss.hardness_mode is None
    ref_cfg = theirs(tiny, **defaults).get_config_dict()
    cfg = loss.get_config_dict()
    assert {k: cfg[k] for k in ref_cfg} == ref_cfg
    # a mode with strength 0 weights nothing (the library only warns); strength > 0 is refused
    ours(tiny, hardness_mode="hard_negatives", hardness_strength=0.0)
    with pytest.raises(ValueError, match="hardness_strength=5.0 is not fused"):
        ours(tiny, hardness_mode="hard_negatives", hardness_strength=5.0)
    with pytest.raises(ValueError, match="hardness_mode must be one of"):
        ours(tiny, hardness_mode="hardest")
    with pytest.raises(ValueError, match="non-negative"):
        ours(tiny, hardness_strength=-1.0)
    with pytest.raises(ValueError, match="doc_to_doc.*not fused|not fused.*doc_to_doc"):
        ours(tiny, directions=("query_to_doc", "doc_to_doc"))
    with pytest.raises(ValueError, match="'query_to_doc' direction is required"):
        ours(tiny, directions=("doc_to_query",))
    reordered = ours(tiny, directions=("doc_to_query", "query_to_doc"))
    assert reordered.directions == ("query_to_doc", "doc_to_query")


def _columns_of(b, n_neg):
    cols = [[SENTENCES[i % 12] for i in range(b)], [SENTENCES[(i + 5) % 12] for i in range(b)]]
    for k in range(n_neg):
        cols.append([SENTENCES[(3 * i + k + 7) % 12] for i in range(b)])
    return cols


@pytest.mark.parametrize(
    "mini_batch_size, directions, n_neg",
    [
        (4, ("query_to_doc",), 1),  # the acceptance case: 10 rows -> mini-batches of 4, 4, 2
        pytest.param(3, ("query_to_doc", "doc_to_query"), 0, marks=SLOW),
        pytest.param(16, ("query_to_doc",), 2, marks=SLOW),  # one mini-batch
    ],
)
def test_cached_mnrl_matches_library(tiny, mini_batch_size, directions, n_neg):
    """CachedMultipleNegativesRankingLoss: loss and every parameter gradient equal to
    sentence-transformers' CachedMultipleNegativesRankingLoss (float64 reference, fp32 against
    the library's own fp32 error)."""
    kw = dict(scale=15.0, mini_batch_size=mini_batch_size, directions=directions)
    _compare(
        tiny,
        lambda m: st_losses.CachedMultipleNegativesRankingLoss(m, **kw),
        lambda m: G.CachedMultipleNegativesRankingLoss(m, **kw, backend="torch"),
        _columns_of(10, n_neg),
    )


def test_cached_gamma_equals_uncached_and_updates_state_once(tiny):
    """CachedGammaMultipleNegativesRankingLoss at mini_batch_size 4 (3 mini-batches of a batch of
    10) returns the loss of GammaMultipleNegativesRankingLoss with the same draws, gives the same
    parameter gradients and leaves the same state (one update per batch)."""
    cols = _columns_of(10, 0)
    index = torch.tensor([3, 17, 5, 0, 11, 9, 2, 14, 8, 6])
    out = {}
    for cached in (False, True):
        model = copy.deepcopy(tiny).double()
        kw = dict(scale=10.0, generator=torch.Generator().manual_seed(5), backend="torch")
        if cached:
            fn = G.CachedGammaMultipleNegativesRankingLoss(model, 20, mini_batch_size=4, **kw)
        else:
            fn = G.GammaMultipleNegativesRankingLoss(model, 20, **kw)
        loss, grads = _loss_and_grads(fn, model, _features(model, cols), index)
        out[cached] = loss, grads, fn.gamma.state_dict()
    assert_close_fp64(out[True][0], out[False][0], "loss")
    for k, g in out[False][1].items():
        if g is not None:
            assert_close_fp64(out[True][1][k], g, k)
    for k, v in out[False][2].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(out[True][2][k], v), k
    assert int(out[True][2]["image_rate.visited"].sum()) == 10


def test_one_pair_batch_error_names_drop_last(tiny):
    loss = G.SogCLRMultipleNegativesRankingLoss(tiny, num_samples=4, backend="torch")
    with pytest.raises(ValueError, match="dataloader_drop_last=True"):
        loss(_features(tiny, [SENTENCES[:1], SENTENCES[1:2]]), torch.tensor([2]))
