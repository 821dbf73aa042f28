"""HF BlipForImageTextRetrieval -> mmedge export -> torch-free ITC embeddings, ITM scores, re-ranked search.

Parity is against transformers: a small random model and a local BERT-style tokenizer written with
`save_pretrained` (the whole BlipProcessor), images read from files through mmedge's preprocessing
against BlipImageProcessor (PIL).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZE = 32
WORDS = [
    "a",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "star",
    "small",
    "large",
    "on",
    "the",
    "left",
    "dog",
]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXTS = [
    "a red circle",
    "a small blue square on the left",
    "the dog",
    "a large green star",
    "a red dog on the left of a blue circle",
]


def _tokenizer():
    """A WordPiece tokenizer in BERT's form: [CLS] text [SEP], [PAD] = 0."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS + [f"w{i}" for i in range(30)])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.add_special_tokens(SPECIALS)
    return transformers.BertTokenizerFast(tokenizer_object=tok), len(vocab)


def _images(root: Path, n: int, seed: int = 0) -> list[Path]:
    """PNG files of different sizes and aspect ratios (the resize matters)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
        path = root / f"img{i}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def blip(tmp_path_factory: pytest.TempPathFactory):
    from hf_tiny import save_blip_model, tiny_blip_config

    from mmedge import sdk
    from mmedge.export.exporter import export_model

    root = tmp_path_factory.mktemp("blip")
    hf_tok, vocab = _tokenizer()
    cfg = tiny_blip_config(SIZE, {"vocab_size": vocab, "bos_token_id": 2}, image_text_hidden_size=16)
    torch.manual_seed(0)
    hf = transformers.BlipForImageTextRetrieval(cfg).eval()
    with torch.no_grad():  # HF's init makes every pair score about 0.5; spread the match scores
        hf.itm_head.weight.normal_(0, 0.3)
        hf.vision_model.embeddings.class_embedding.normal_(0, 1.0)
    processor = save_blip_model(root / "src", hf, hf_tok, SIZE)
    export_model(root / "src", root / "pkg")
    return hf, processor, sdk.Pipeline(str(root / "pkg")), root


def _hf_inputs(processor, images: list[Path], texts: list[str]) -> tuple:
    from PIL import Image

    px = processor(images=[Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
    tok = processor(text=texts, return_tensors="pt", padding=True)
    return px, tok["input_ids"], tok["attention_mask"]


def _hf_itc(hf, px, ids, mask) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        img = hf.vision_proj(hf.vision_model(pixel_values=px).last_hidden_state[:, 0])
        txt = hf.text_proj(hf.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])
    norm = torch.nn.functional.normalize
    return norm(img, dim=-1).numpy(), norm(txt, dim=-1).numpy()


def _hf_itm(hf, px, ids, mask) -> np.ndarray:
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=True).itm_score
    return logits.softmax(dim=-1)[:, 1].numpy()


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_package_wires_the_itm_beside_the_image_path(blip) -> None:
    _, _, pipe, root = blip
    m = pipe.runner.manifest
    assert (m.family, m.variant, m.task) == ("blip", "itm", "retrieval")
    assert {n: c.role for n, c in m.components.items()} == {
        "vision": "image_encoder",
        "text": "text_encoder",
        "itm": "itm",
    }
    assert m.pipeline.paths["image"].output == "image_embeds"
    assert [s.name for s in m.component("itm").inputs] == ["image_features", "input_ids", "attention_mask"]
    assert m.preprocess is not None and m.preprocess.resize == "exact"
    assert all(c.precisions["fp32"].parity["passed"] for c in m.components.values())
    assert json.loads((root / "src" / "config.json").read_text())["architectures"] == [
        "BlipForImageTextRetrieval"
    ]


def test_itc_embeddings_match_transformers(blip, tmp_path: Path) -> None:
    hf, processor, pipe, _ = blip
    images = _images(tmp_path, 4)
    px, ids, mask = _hf_inputs(processor, images, TEXTS)
    ref_img, ref_txt = _hf_itc(hf, px, ids, mask)
    ours_img = pipe.embed_images([str(p) for p in images])
    ours_txt = pipe.embed_texts(TEXTS)
    assert _row_cosine(ours_img, ref_img).min() >= 0.9999
    assert _row_cosine(ours_txt, ref_txt).min() >= 0.9999
    # transformers' own ITC scores (use_itm_head=False): image i against every text
    with torch.no_grad():
        sims = hf(input_ids=ids, pixel_values=px[:1], attention_mask=mask, use_itm_head=False).itm_score
    np.testing.assert_allclose(ours_img[:1] @ ours_txt.T, sims.numpy(), atol=1e-4)


def test_itm_probabilities_match_transformers(blip, tmp_path: Path) -> None:
    hf, processor, pipe, _ = blip
    images = _images(tmp_path, len(TEXTS), seed=1)
    px, ids, mask = _hf_inputs(processor, images, TEXTS)
    ref = _hf_itm(hf, px, ids, mask)  # pairs: images[i] with TEXTS[i], padded batch
    ours = pipe.itm_scores([str(p) for p in images], TEXTS)
    assert ours.shape == (len(TEXTS),) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-4
    assert ref.max() - ref.min() > 0.05  # the scores differ between pairs: the check has teeth
    # one image against every text: its features are encoded once and repeated
    one = pipe.itm_scores(str(images[0]), TEXTS)
    ref_one = _hf_itm(hf, px[:1].expand(len(TEXTS), -1, -1, -1), ids, mask)
    assert np.abs(one - ref_one).max() <= 1e-4


def test_text_query_rerank_returns_the_itm_ordered_top(blip, tmp_path: Path) -> None:
    hf, processor, pipe, _ = blip
    images = _images(tmp_path, 6, seed=2)
    pipe.index = type(pipe.index)(pipe.dim, model=pipe.model_id)  # a fresh index
    pipe.add_images([str(p) for p in images], labels=[str(p) for p in images])
    query = TEXTS[1]
    px, ids, mask = _hf_inputs(processor, images, [query] * len(images))
    ref = _hf_itm(hf, px, ids, mask)
    hits = pipe.search(query, k=3, rerank=6)
    assert [h.id for h in hits] == list(np.argsort(-ref, kind="stable")[:3])
    assert all(h.itm is not None and abs(h.itm - ref[h.id]) <= 1e-4 for h in hits)
    # Hit.score stays the cosine
    cosines = pipe.embed_images([str(p) for p in images]) @ pipe.embed_texts([query])[0]
    assert all(abs(h.score - cosines[h.id]) < 1e-4 for h in hits)
    # the default re-ranks (the package has an ITM): 16 capped at the index size
    assert [h.id for h in pipe.search(query, k=3)] == [h.id for h in hits]
    # rerank=0: the contrastive order, no ITM score
    plain = pipe.search(query, k=3, rerank=0)
    assert [h.id for h in plain] == list(np.argsort(-cosines)[:3]) and all(h.itm is None for h in plain)
    # rerank=K re-scores only the contrastive top K
    top2 = pipe.search(query, k=1, rerank=2)
    best = max((h.id for h in plain[:2]), key=lambda i: ref[i])
    assert [h.id for h in top2] == [best]


def test_image_query_rerank_scores_the_candidate_texts(blip, tmp_path: Path) -> None:
    hf, processor, pipe, _ = blip
    (image,) = _images(tmp_path, 1, seed=3)
    pipe.index = type(pipe.index)(pipe.dim, model=pipe.model_id)
    pipe.add_texts(TEXTS, ids=list(range(len(TEXTS))), labels=TEXTS)
    px, ids, mask = _hf_inputs(processor, [image] * len(TEXTS), TEXTS)
    ref = _hf_itm(hf, px, ids, mask)
    hits = pipe.search(image, k=len(TEXTS), rerank=len(TEXTS))  # a Path is an image query
    assert [h.id for h in hits] == list(np.argsort(-ref, kind="stable"))
    assert max(abs(h.itm - ref[h.id]) for h in hits) <= 1e-4


def test_source_gives_candidates_without_labels(blip, tmp_path: Path) -> None:
    _, _, pipe, _ = blip
    images = _images(tmp_path, 3, seed=4)
    pipe.index = type(pipe.index)(pipe.dim, model=pipe.model_id)
    pipe.add_images([str(p) for p in images])  # no labels
    hits = pipe.search("a red circle", k=2, rerank=3, source=lambda hit: images[hit.id])
    expected = pipe.itm_scores([str(p) for p in images], "a red circle")
    assert [h.id for h in hits] == list(np.argsort(-expected, kind="stable")[:2])


@pytest.mark.parametrize("rerank", [-1, 2.5, True, "3", 4, 1])
def test_bad_rerank_is_invalid_input(blip, tmp_path: Path, rerank: object) -> None:
    from mmedge.errors import InvalidInputError

    _, _, pipe, _ = blip
    images = _images(tmp_path, 3, seed=5)
    pipe.index = type(pipe.index)(pipe.dim, model=pipe.model_id)
    pipe.add_images([str(p) for p in images], labels=[str(p) for p in images])
    # 4: larger than the index of 3; 1: fewer candidates than k=2
    with pytest.raises(InvalidInputError, match="rerank"):
        pipe.search("a red circle", k=2, rerank=rerank)


def test_candidates_without_a_source_are_invalid_input(blip, tmp_path: Path) -> None:
    from mmedge.errors import InvalidInputError

    _, _, pipe, _ = blip
    pipe.index = type(pipe.index)(pipe.dim, model=pipe.model_id)
    pipe.add_images([str(p) for p in _images(tmp_path, 2, seed=6)])  # no labels
    with pytest.raises(InvalidInputError, match="no image to re-rank with"):
        pipe.search("a red circle", k=1)
    assert len(pipe.search("a red circle", k=1, rerank=0)) == 1


def test_itm_pairs_must_line_up(blip, tmp_path: Path) -> None:
    from mmedge.errors import InvalidInputError

    _, _, pipe, _ = blip
    images = [str(p) for p in _images(tmp_path, 2, seed=7)]
    with pytest.raises(InvalidInputError, match="give pairs"):
        pipe.itm_scores(images, TEXTS[:3])
    with pytest.raises(InvalidInputError, match="no texts"):
        pipe.itm_scores(images, [])


def test_other_blip_architectures_are_refused(tmp_path: Path) -> None:
    from mmedge.errors import UnsupportedError
    from mmedge.models.blip.hf import blip_config

    with pytest.raises(UnsupportedError, match="BlipForConditionalGeneration"):  # names the supported ones
        blip_config({"architectures": ["BlipModel"]})
    assert blip_config({"architectures": ["BlipForConditionalGeneration"]})["variant"] == "caption"
    assert blip_config({"architectures": ["BlipForQuestionAnswering"]})["variant"] == "vqa"
    with pytest.raises(UnsupportedError, match="cross-attention"):
        blip_config({"architectures": ["BlipForImageTextRetrieval"], "text_config": {"is_decoder": False}})


def test_cli_search_reranks_and_reports_itm(blip, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mmedge.sdk.cli import main

    _, _, _, root = blip
    folder = tmp_path / "photos"
    folder.mkdir()
    _images(folder, 3, seed=8)
    argv = ["search", str(root / "pkg"), "--add", str(folder), "--index", str(tmp_path / "idx"), "--json"]
    capsys.readouterr()
    assert main([*argv, "-k", "2", "--rerank", "3", "a red circle"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 2 and all(0 <= h["itm"] <= 1 for h in hits)
    assert hits[0]["itm"] >= hits[1]["itm"]
    assert main([*argv, "--rerank", "0", "a red circle"]) == 0
    assert all("itm" not in h for h in json.loads(capsys.readouterr().out)["hits"])


def test_manifest_refuses_an_itm_reading_what_the_image_path_lacks(blip) -> None:
    from dataclasses import replace

    from mmedge.errors import IntegrityError
    from mmedge.runtime.manifest import TensorSpec

    _, _, pipe, _ = blip
    m = pipe.runner.manifest
    itm = m.component("itm")
    for wrong in (
        TensorSpec("image_tokens", "float32", itm.inputs[0].shape),  # no such image path value
        TensorSpec("image_features", "float32", ("batch", 3, 32)),  # not the path value's shape
    ):
        bad = replace(itm, inputs=(wrong, *itm.inputs[1:]))
        with pytest.raises(IntegrityError, match="itm component"):
            replace(m, components={**m.components, "itm": bad})
    clip_like = {n: c for n, c in m.components.items() if n != "itm"}
    assert replace(m, components=clip_like).has_role("itm") is False  # the ITM is optional
