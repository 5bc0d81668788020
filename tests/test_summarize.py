"""summarize.py's pieces: prompt building, ROUGE, agreement, dataset loading."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import REPO_ROOT
from glm_engine import GlmEngineError
from glm_engine.text.dataset import load_articles
from glm_engine.text.tokenizer import ChatGLMTokenizer
from summarize import agreement, rouge_scores, summarize_prompt

SAMPLE = REPO_ROOT / "data" / "cnn_dailymail_sample.jsonl"


def test_prompt_is_article_tldr_with_prefix(tiny_tokenizer_dir):
    tokenizer = ChatGLMTokenizer.from_dir(tiny_tokenizer_dir)
    prompt = summarize_prompt("  The plan isn't ready ", tokenizer, 800)
    assert prompt[:2] == [tokenizer.special_token_ids["[gMASK]"], tokenizer.special_token_ids["sop"]]
    assert tokenizer.decode(prompt) == "The plan isn't ready  TL;DR:"


def test_long_prompt_keeps_prefix_and_the_end_of_the_article(tiny_tokenizer_dir):
    tokenizer = ChatGLMTokenizer.from_dir(tiny_tokenizer_dir)
    article = load_articles(str(SAMPLE))[0]["article"]
    prompt = summarize_prompt(article, tokenizer, 50)
    assert len(prompt) == 50
    assert prompt[:2] == tokenizer.encode("")
    assert tokenizer.decode(prompt).endswith("TL;DR:")


def test_rouge_of_identical_and_disjoint_texts():
    scores = rouge_scores(["the cat sat on the mat", "dogs bark"], ["the cat sat on the mat", "dogs bark"])
    assert scores == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "rougeLsum": 100.0}
    assert rouge_scores(["alpha beta"], ["gamma delta"])["rouge1"] == 0.0


def test_agreement_counts_exact_matches_and_first_divergence():
    assert agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == (1.0, None)
    assert agreement([[1, 2, 3], [4, 5], [6]], [[1, 9, 3], [4, 5], [6, 7]]) == (pytest.approx(1 / 3), 1.0)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_dataset_formats(tmp_path, suffix):
    records = [{"article": f"Article {i}, with a comma", "highlights": f"Point {i}.\nMore."} for i in range(3)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records))
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".csv":
        with open(path, "w", newline="") as stream:
            writer = csv.DictWriter(stream, ["article", "highlights"])
            writer.writeheader()
            writer.writerows(records)
    else:
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
    assert load_articles(str(path)) == records


def test_save_to_disk_directory(tmp_path):
    import datasets

    records = [{"article": "An article.", "highlights": "A highlight."}]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "saved"))
    assert load_articles(str(tmp_path / "saved")) == records


def test_bundled_sample_is_in_cnn_dailymail_format():
    records = load_articles(str(SAMPLE))
    assert len(records) >= 30
    assert all(len(r["article"].split()) > 100 and r["highlights"] for r in records)


@pytest.mark.parametrize("content, message", [
    ('{"article": "x"}\n', "lacks 'article' and 'highlights'"),
    ("not json\n", "cannot be parsed"),
])
def test_bad_dataset_files(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(GlmEngineError, match=message):
        load_articles(str(tmp_path / "bad.jsonl"))


def test_unknown_dataset_format(tmp_path):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(GlmEngineError, match="unknown format '.txt'"):
        load_articles(str(tmp_path / "data.txt"))
