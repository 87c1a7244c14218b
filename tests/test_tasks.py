"""seq-cls and seq2seq: train, evaluate, predict/generate and merge exactly, in 4-bit and 8-bit, on tiny
models built in code (a Llama body with a classification head; T5 and BART encoder-decoders)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from helpers import write_jsonl
from qfine.cli import main
from qfine.util.compare import relative_difference

POS, NEG = ["good", "great", "lovely", "superb", "fine"], ["bad", "awful", "poor", "terrible", "dull"]


def _reviews(path, n, seed=0, frame="the film was {}"):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        rows.append({"text": frame.format(rng.choice(POS if label == "pos" else NEG)), "label": label})
    return write_jsonl(path, rows)


def _train(*argv) -> None:
    assert main(["train", *argv, "--report-samples", "1", "--compute-dtype", "fp32", "--device", "cpu"]) == 0


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_classifier_trains_evaluates_predicts_and_merges(tiny_dir, tmp_path, capsys, quantization):
    from transformers import AutoModelForSequenceClassification

    from qfine.generation.load import load_for_inference

    train = _reviews(tmp_path / "train.jsonl", 80)
    evals = _reviews(tmp_path / "eval.jsonl", 20, seed=1, frame="it was {}")
    run = tmp_path / "run"
    _train("--model", str(tiny_dir), "--task", "seq-cls", "--data", str(train), "--eval-data", str(evals),
           "--quantization", quantization, "--output-dir", str(run), "--max-steps", "30", "--batch-size", "8",
           "--learning-rate", "5e-3", "--save-steps", "10")
    out = capsys.readouterr().out
    assert "labels: neg, pos" in out
    assert json.loads((run / "labels.json").read_text()) == ["neg", "pos"]
    losses = _losses(run)
    assert losses[-1] < 0.5 * losses[0], losses
    page = (run / "report.html").read_text()
    assert "Confusion matrix (eval data)" in page and "<th>neg</th>" in page

    assert main(["eval", str(run), "--data", str(evals), "--output", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["results"]
    assert list(rows) == ["base", "base+adapter", "merged"] and result["labels"] == ["neg", "pos"]
    assert rows["base+adapter"]["accuracy"] >= 75 and rows["base+adapter"]["accuracy"] > rows["base"]["accuracy"]
    assert rows["merged"] == pytest.approx({**rows["base+adapter"], "seconds": rows["merged"]["seconds"]})
    assert sum(map(sum, result["confusion"])) == 20

    assert main(["predict", str(run), "--text", "the film was superb", "--text", "it was awful",
                 "--output", "json"]) == 0
    preds = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["input"] for p in preds] == ["the film was superb", "it was awful"]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-3 for p in preds)

    # exact merge: plain transformers gives the adapter model's logits and labels
    assert main(["merge", str(run), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    loaded = load_for_inference(str(run))
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert plain.config.id2label == {0: "neg", 1: "pos"}
    enc = loaded.tokenizer(["the film was superb", "it was awful", "the film was dull"], padding=True,
                           return_tensors="pt")
    with torch.no_grad():
        ref = loaded.model(**enc.to(loaded.device)).logits
        got = plain(**enc.to(plain.device)).logits
    assert torch.equal(got.argmax(-1).cpu(), ref.argmax(-1).cpu())
    _check_merge(loaded.model, lambda m: m(**enc.to(loaded.device)).logits, got, ref, quantization)


def _check_merge(model, logits, got, ref, quantization):
    """The merged folder's logits ``got`` against the trained model's ``ref``. 4-bit layers compute
    with the dequantized weight, so the merge is exact to fp32 rounding. bitsandbytes' 8-bit layers
    also quantize their *inputs* (LLM.int8()), so there the exact reference is the same weights —
    dequantized + LoRA — held in 16/32-bit, which qfine's in-memory merge builds."""
    from qfine.methods.lora import merged

    if quantization != "int8":
        assert relative_difference(got, ref) <= 1e-5
        return
    assert relative_difference(got, ref) <= 2e-2  # the int8 activation rounding, measured 2.8e-3
    with torch.no_grad(), merged(model):
        exact = logits(model)
    assert relative_difference(got, exact) <= 1e-5


@pytest.mark.parametrize("rows,needle", [
    ([{"text": "fine", "label": "pos"}, {"text": "bad"}], ":2: no label column"),
    ([{"text": "fine", "label": "pos"}, {"text": "", "label": "neg"}], ":2: column 'text' (text) is empty"),
    ([{"text": "fine", "label": "pos"}, {"text": "ok", "label": "pos"}], "every row has the label 'pos'"),
    ([{"text": "fine", "label": 1.5}, {"text": "bad", "label": 0}], ":1: label 1.5 in column 'label' is not a class"),
])
def test_classifier_data_errors_name_the_row(tiny_dir, tmp_path, capsys, rows, needle):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    code = main(["train", "--model", str(tiny_dir), "--task", "seq-cls", "--data", str(data),
                 "--output-dir", str(tmp_path / "run"), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and needle in err, err
    assert not (tmp_path / "run").exists()


def test_unknown_label_in_the_eval_data(tiny_dir, tmp_path, capsys):
    train = _reviews(tmp_path / "train.jsonl", 8)
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"text": "so so", "label": "meh"}])
    code = main(["train", "--model", str(tiny_dir), "--task", "seq-cls", "--data", str(train), "--eval-data",
                 str(evals), "--output-dir", str(tmp_path / "run"), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and f"{evals}:1: label 'meh' is not one of the training labels (neg, pos)" in err


@pytest.fixture(scope="module")
def seq2seq_models(tmp_path_factory, tokenizer_dir):
    """Tiny random T5 and BART (d_model 32, 2+2 layers) with the tests' tokenizer."""
    from transformers import (
        AutoTokenizer,
        BartConfig,
        BartForConditionalGeneration,
        T5Config,
        T5ForConditionalGeneration,
    )

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    pad, eos = tok.pad_token_id, tok.eos_token_id
    root = tmp_path_factory.mktemp("s2s")
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                             num_heads=4, decoder_start_token_id=pad, pad_token_id=pad,
                                             eos_token_id=eos))
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        pad_token_id=pad, bos_token_id=eos, eos_token_id=eos, decoder_start_token_id=eos, forced_eos_token_id=eos))
    out = {}
    for name, model in (("t5", t5), ("bart", bart)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def _summaries(path, n=40):
    rng = random.Random(0)
    words = "apple river stone cloud light green small house".split()
    rows = []
    for _ in range(n):
        w = rng.sample(words, 3)
        rows.append({"document": "summarize: " + " ".join(w) + " and more words here", "summary": " ".join(w)})
    return write_jsonl(path, rows)


@pytest.mark.parametrize("kind,quantization", [("t5", "nf4"), ("t5", "int8"), ("bart", "nf4"), ("bart", "int8")])
def test_seq2seq_trains_generates_and_merges_exactly(seq2seq_models, tmp_path, capsys, kind, quantization):
    from transformers import AutoModelForSeq2SeqLM

    from qfine.generation.load import load_for_inference

    data = _summaries(tmp_path / "d.jsonl")
    run = tmp_path / "run"
    _train("--model", str(seq2seq_models[kind]), "--task", "seq2seq", "--data", str(data), "--eval-ratio", "0.2",
           "--quantization", quantization, "--output-dir", str(run), "--max-steps", "20", "--batch-size", "8",
           "--learning-rate", "1e-2", "--save-steps", "10", "--num-beams", "2", "--max-new-tokens", "6")
    losses = _losses(run)
    assert losses[-1] < losses[0], losses
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data), "--limit", "4", "--output", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert list(rows) == ["base", "base+adapter", "merged"] and {"rougeL", "bleu"} <= set(rows["merged"])
    assert main(["generate", str(run), "--prompt", "summarize: apple river stone", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()

    assert main(["merge", str(run), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    loaded = load_for_inference(str(run))
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    enc = loaded.tokenizer(["summarize: apple river stone and more"], return_tensors="pt")
    dec = torch.tensor([[loaded.model.config.decoder_start_token_id, 100, 200, 300]])
    with torch.no_grad():
        ref = loaded.model(**enc.to(loaded.device), decoder_input_ids=dec.to(loaded.device)).logits
        got = plain(**enc, decoder_input_ids=dec).logits
    _check_merge(loaded.model, lambda m: m(**enc.to(loaded.device), decoder_input_ids=dec.to(loaded.device)).logits,
                 got, ref, quantization)
    # beams, length penalty and the token bounds reach generate: the same search in plain transformers
    from qfine.objectives.seq2seq import generate

    ours = generate(loaded.model, loaded.tokenizer, ["summarize: apple river stone"], loaded.generation)
    ids = plain.generate(**loaded.tokenizer(["summarize: apple river stone"], return_tensors="pt"), num_beams=2,
                         max_new_tokens=6, min_new_tokens=0, early_stopping=True, length_penalty=1.0, do_sample=False,
                         pad_token_id=loaded.tokenizer.pad_token_id)
    assert ours == [t.strip() for t in loaded.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def test_fp16_is_not_used_where_it_overflows():
    from qfine.objectives.seq2seq import safe_precision

    assert safe_precision("fp16", "t5", bf16_ok=True)[0] == "bf16"
    assert safe_precision("fp16", "mt5", bf16_ok=False)[0] == "fp32"
    assert safe_precision("fp16", "bart", bf16_ok=False) == ("fp16", None)
    assert safe_precision("bf16", "t5", bf16_ok=True) == ("bf16", None)


@pytest.mark.slow
def test_bundled_model_learns_sentiment_of_words_it_never_saw(tmp_path, bundled_dir, capsys):
    """The seed's sentiment recipe on the bundled SmolLM2-135M in 4-bit, on the CPU: held-out rows
    whose sentiment words never occur in training (VADER lexicon ratings) are classified to ≥ 90 %
    (measured 95.8 % after 40 steps on 560 rows, 49 % before), and the merged bf16 model in plain
    transformers predicts the same labels."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from qfine.data.sentiment import build, lexicon_path, polar_words

    build(tmp_path / "data", words=200)
    polar = polar_words(lexicon_path())

    def rows_and_words(name):
        rows = [json.loads(line) for line in (tmp_path / "data" / name).read_text().splitlines()]
        return rows, {w.strip(".,:") for r in rows for w in r["text"].split() if w.strip(".,:") in polar}

    evals, eval_words = rows_and_words("eval.jsonl")
    _, train_words = rows_and_words("train.jsonl")
    assert len(eval_words) == 120 and not eval_words & train_words
    run = tmp_path / "run"
    assert main(["train", "examples/sentiment-default.yaml", "--data", str(tmp_path / "data" / "train.jsonl"),
                 "--eval-data", str(tmp_path / "data" / "eval.jsonl"), "--output-dir", str(run),
                 "--eval-steps", "40", "--save-steps", "40", "--max-steps", "40", "--report-samples", "0"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(tmp_path / "data" / "eval.jsonl"), "--output", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    with capsys.disabled():
        print(f"\n[sentiment] held-out accuracy base {rows['base']['accuracy']:.1f}, adapter "
              f"{rows['base+adapter']['accuracy']:.1f}, merged {rows['merged']['accuracy']:.1f}")
    assert rows["base+adapter"]["accuracy"] >= 90

    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert main(["predict", str(run), "--data", str(tmp_path / "data" / "eval.jsonl"), "--output", "json"]) == 0
    ours = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    texts = [r["text"] for r in evals]
    with torch.no_grad():
        got = []
        for i in range(0, len(texts), 16):
            enc = tok(texts[i: i + 16], padding=True, return_tensors="pt")
            got += [plain.config.id2label[int(k)] for k in plain(**enc).logits.argmax(-1)]
    assert len(ours) == len(got) == len(evals)
    assert sum(a != b for a, b in zip(ours, got)) <= 1  # bf16 merge: a borderline row may flip
