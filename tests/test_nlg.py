"""The NLG family on a tiny random Llama with a causal-LM head: prompt masking, greedy generation (against a
step-by-step argmax loop; padding, batch size and merging do not change it), option scoring, held-out loss, the text
metrics on hand-computed cases, length-bucketed batches, and each task family end to end from the command line."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import data_dir, tiny_cfg
from omegaconf import OmegaConf

from lorafactory.config import CONF_DIR, check_overrides
from lorafactory.errors import ConfigError, UserError
from lorafactory.models import build_model, unfreeze
from lorafactory.results.significance import EXAMPLE_METRICS, example_metric
from lorafactory.tasks import TASKS, Evaluation
from lorafactory.tasks.causal import CausalCollator
from lorafactory.tasks.data import Rows
from lorafactory.tasks.generation import greedy_generate, option_logliks, token_nll
from lorafactory.tasks.text_metrics import ANSWER_RULES, bleu, exact_match, extract_answer, rouge_l, same_number
from lorafactory.training.data import EpochSampler
from lorafactory.variants import build_variant
from lorafactory.variants.base import adapter_parameters, merged


def causal():
    loaded = build_model(tiny_cfg("tiny-llama"), 0, kind="causal-lm")
    loaded.module.eval()
    return loaded


def task_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONF_DIR / "task" / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def random_prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(1000, 5000, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


# --- the model -------------------------------------------------------------------------------------------------------


def test_a_causal_lm_keeps_its_pretrained_head_frozen_and_unadapted():
    loaded = causal()
    model = loaded.module
    assert loaded.kind == "causal-lm" and loaded.head == () and loaded.frozen == ("lm_head",)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as SmolLM2's
    build_variant({"name": "lora", "targets": "all-linear"}).adapt(model, head=loaded.not_adapted)
    unfreeze(model, loaded.head)
    assert type(model.lm_head) is torch.nn.Linear and not model.lm_head.weight.requires_grad
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(model)}


def test_full_fine_tuning_of_a_causal_lm_trains_its_output_layer_at_full_rate():
    """`full` trains every pretrained weight, the (tied) output layer included, in the method's own group at its rate:
    the output layer is pretrained, not a new head trained at LoRA's rate."""
    from lorafactory.training.optim import build_optimizer

    loaded = causal()
    model = loaded.module
    variant = build_variant({"name": "full"})
    variant.adapt(model, head=loaded.not_adapted)
    unfreeze(model, loaded.head)
    assert model.lm_head.weight.requires_grad
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in variant.trained_parameters(model)}
    optim = OmegaConf.create(
        {"lr": 1e-4, "weight_decay": 0.0, "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True}}
    )
    optimizer = build_optimizer(optim, variant, model)
    [group] = optimizer.param_groups  # no head group: nothing here is a new head
    assert group["lr"] == 1e-4 and any(p is model.lm_head.weight for p in group["params"])


def test_a_linear_probe_on_a_causal_lm_is_one_line_exit_2(workdir):
    """`head_only` trains the task head alone, and a causal LM's head is pretrained and frozen: nothing to train."""
    result = subprocess.run(
        [sys.executable, "-m", "lorafactory", *TINY_NLG, "task=commonsense/boolq", "variant=head_only"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert "variant=head_only trains no parameter" in line and "untuned_metric" in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=tiny-bert", "task=nlg/e2e"], "model tiny-bert is not a causal language model"),
        (["model=minilm-l6", "task=math/gsm8k"], "task math/gsm8k generates text: use a decoder, e.g. model="),
        (["model=tiny-llama", "task=nlg/e2e", "task.prompt='{meaning}'"], "task.prompt uses {meaning}"),
        (["model=tiny-llama", "task=nlg/e2e", "task.response='{x}'"], "task.response uses {x}"),
        (["model=tiny-llama", "task=nlg/e2e", "task.max_new_tokens=0"], "task.max_new_tokens must be an integer >= 1"),
        (["model=tiny-llama", "task=nlg/e2e", "task.stop=[]"], None),
    ],
)
def test_wrong_model_kinds_and_task_fields_are_one_line(args, expected):
    if expected is None:
        check_overrides(args)  # an empty stop list is allowed
        return
    with pytest.raises(UserError, match=expected):
        check_overrides(args)


def test_an_encoder_on_a_generation_task_exits_2_with_one_line(workdir):
    result = subprocess.run(
        [sys.executable, "-m", "lorafactory", "model=tiny-bert", "task=nlg/e2e"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert "not a causal language model" in line and "model=smollm2-135m" in line


# --- training examples -----------------------------------------------------------------------------------------------


def test_prompt_masked_loss_equals_a_hand_computation():
    loaded = causal()
    model, eos = loaded.module, loaded.tokenizer.eos_token_id
    task = TASKS.get("nlg/e2e")
    examples = [
        {
            "prompt_ids": [1005, 1006, 1007],
            "target_ids": [[2008, 2009, eos]],
            "references": [],
            "option_ids": [],
            "answer": -1,
        },
        {"prompt_ids": [1010, 1011], "target_ids": [[2012, eos]], "references": [], "option_ids": [], "answer": -1},
    ]
    for masked in (True, False):
        rows = task._rows(examples, task_cfg("nlg/e2e", mask_prompt=masked), every_target=True)
        batch = CausalCollator(loaded.tokenizer.pad_token_id)(
            [{k: v[i] for k, v in rows.columns.items()} for i in range(2)]
        )
        with torch.no_grad():
            loss = model(**batch).loss
            total, count = 0.0, 0
            for ex in examples:
                ids = ex["prompt_ids"] + ex["target_ids"][0]
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
                first = len(ex["prompt_ids"]) if masked else 1  # the first token is never predicted
                for t in range(first, len(ids)):
                    total -= float(logprobs[t - 1, ids[t]])
                    count += 1
        assert float(loss) == pytest.approx(total / count, rel=1e-4)
    assert rows.columns["labels"][0] == [1005, 1006, 1007, 2008, 2009, eos]  # unmasked: every token


def test_training_rows_are_prompt_then_response_then_eos(fake_mirror, cache_dir):
    loaded = causal()
    tok = loaded.tokenizer
    task, cfg = TASKS.get("nlg/e2e"), task_cfg("nlg/e2e")
    train, validation = task.splits(tok, cfg, cache_dir, fake_mirror)
    assert len(train) == 2 * (40 - 32) and len(validation) == 32  # every reference trains; 32 MRs held out
    for ids, labels in zip(train.columns["input_ids"], train.columns["labels"], strict=True):
        n_prompt = sum(1 for t in labels if t == -100)
        assert ids[-1] == tok.eos_token_id and labels[n_prompt:] == ids[n_prompt:]
        assert tok.decode(ids[:n_prompt]).startswith("meaning representation")
    test = task.test_set(tok, cfg, cache_dir, fake_mirror)
    assert len(test.rows) == 12 and all(len(r) == 2 for r in test.rows.columns["references"])
    assert len(test.heldout) == cfg.forgetting_samples or len(test.heldout) == 30


def test_length_buckets_group_similar_lengths_and_stay_resumable():
    lengths = [int(x) for x in torch.randint(5, 200, (203,), generator=torch.Generator().manual_seed(0))]
    sampler = EpochSampler(203, seed=3, lengths=lengths, batch_size=8, buckets=4)
    order = sampler.order(0)
    assert sorted(order) == list(range(203)) and order == sampler.order(0) and order != sampler.order(1)
    batches = [order[i : i + 8] for i in range(0, 203, 8)]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    plain = EpochSampler(203, seed=3).order(0)
    plain_spread = sum(
        max(lengths[i] for i in plain[j : j + 8]) - min(lengths[i] for i in plain[j : j + 8]) for j in range(0, 203, 8)
    ) / len(batches)
    assert spread < plain_spread / 3
    assert len(batches[-1]) == 203 % 8  # the short batch comes last: batch boundaries stay at multiples of 8
    sampler.resume(0, 16)
    assert list(sampler) == order[16:]


# --- generation ------------------------------------------------------------------------------------------------------


def stepwise_argmax(model, prompt: list[int], n: int, eos: int) -> list[int]:
    """The definition of greedy decoding: the whole sequence through the model at every step, no cache, no padding."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            seq.append(token)
    return out


def test_greedy_generation_equals_a_stepwise_argmax_loop():
    loaded = causal()
    prompts = random_prompts(5)
    out = greedy_generate(loaded.module, loaded.tokenizer, prompts, max_new_tokens=12, batch_size=5)
    for prompt, ids in zip(prompts, out.token_ids, strict=True):
        assert ids == stepwise_argmax(loaded.module, prompt, 12, loaded.tokenizer.eos_token_id)
    assert out.tokens == [len(ids) for ids in out.token_ids] and out.tokens_per_s > 0


def test_left_padding_and_batch_size_do_not_change_outputs():
    loaded = causal()
    prompts = random_prompts(7, seed=1)
    runs = [greedy_generate(loaded.module, loaded.tokenizer, prompts, 10, batch_size=b).token_ids for b in (1, 3, 7)]
    assert runs[0] == runs[1] == runs[2]


def test_generation_stops_at_eos_and_stop_strings():
    loaded = causal()
    prompt = random_prompts(1, seed=2)[0]
    free = greedy_generate(loaded.module, loaded.tokenizer, [prompt], 12)
    text = free.texts[0]
    words = text.split()
    assert len(words) >= 3, text
    stop = words[-1]
    stopped = greedy_generate(loaded.module, loaded.tokenizer, [prompt], 12, stop=["zzz", stop])
    # cut before the first occurrence after some content (a stop string at the very start does not stop)
    assert stopped.texts[0] == text[: text.find(stop, 1)].strip()
    assert len(stopped.token_ids[0]) < len(free.token_ids[0]) or text.find(stop, 1) == len(text) - len(stop)


@pytest.mark.parametrize("variant", ["lora", "dora", "pissa"])
def test_merged_and_unmerged_generation_agree(variant):
    loaded = causal()
    model = loaded.module
    build_variant({"name": variant, "targets": "all-linear", "r": 4}).adapt(model, head=loaded.not_adapted)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))
    prompts = random_prompts(4, seed=3)
    before = [p.detach().clone() for p in model.parameters()]
    unmerged_out = greedy_generate(model, loaded.tokenizer, prompts, 10, batch_size=2).token_ids
    with merged(model):
        merged_out = greedy_generate(model, loaded.tokenizer, prompts, 10, batch_size=2).token_ids
    assert merged_out == unmerged_out
    for p, q in zip(before, model.parameters(), strict=True):  # unmerged afterwards
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


# --- scoring ---------------------------------------------------------------------------------------------------------


def test_option_scoring_matches_per_sequence_likelihoods_and_picks_the_argmax():
    loaded = causal()
    model, pad = loaded.module, loaded.tokenizer.pad_token_id
    contexts = random_prompts(3, seed=4)
    options = [[[2001], [2002, 2003], [2004, 2005, 2006]], [[3001, 3002], [3003]], [[4001], [4002], [4003], [4004]]]
    scores = option_logliks(model, pad, contexts, options, batch_size=3)
    with torch.no_grad():
        for ctx, opts, got in zip(contexts, options, scores, strict=True):
            for opt, value in zip(opts, got, strict=True):
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([ctx + opt])).logits[0], -1)
                expected = sum(float(logprobs[len(ctx) + j - 1, t]) for j, t in enumerate(opt))
                assert value == pytest.approx(expected, abs=1e-4)
    # The task predicts the option with the highest likelihood: with the answer set to it, accuracy is 1.
    task = TASKS.get("commonsense/boolq")
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    rows = Rows(
        {
            "input_ids": contexts,
            "labels": contexts,
            "prompt_ids": contexts,
            "references": [[]] * 3,
            "option_ids": options,
            "answer": best,
        }
    )
    result = task._measure(model, loaded.tokenizer, rows, task_cfg("commonsense/boolq"))
    assert result.metrics == {"accuracy": 1.0}
    rows.columns["answer"] = [(b + 1) % len(o) for b, o in zip(best, options, strict=True)]
    assert task._measure(model, loaded.tokenizer, rows, task_cfg("commonsense/boolq")).metrics == {"accuracy": 0.0}


ARC_LIKE = {  # LLM-Adapters' ARC layout; the second question mentions "Answer" outside the option labels
    "instruction": [
        "Please choose the correct answer to the question: Which gas do plants take in?\n\nAnswer1: oxygen "
        "Answer2: carbon dioxide Answer3: helium\n\nAnswer format: answer1/answer2/answer3",
        "Please choose the correct answer to the question: Answer this: 2 + 2?\n\nAnswer1: four Answer2: the "
        "Answer is five\n\nAnswer format: answer1/answer2",
        "Please answer the following question with true or false, question: is ice cold?\n\nAnswer format: true/false",
    ],
    "input": ["", "", ""],
    "output": ["the correct answer is answer2", "the correct answer is answer1", "the correct answer is true"],
    "answer": ["answer2", "answer1", "true"],
}


@pytest.mark.parametrize("answers", ["label", "text"])
def test_commonsense_responses_name_the_label_or_the_options_text(answers):
    examples = TASKS.get("commonsense/arc_easy").examples(ARC_LIKE, task_cfg("commonsense/arc_easy", answers=answers))
    prefix = "the correct answer is "
    if answers == "label":  # LLM-Adapters' own responses
        assert [ex["targets"] for ex in examples] == [[o] for o in ARC_LIKE["output"]]
        assert examples[0]["options"] == [prefix + f"answer{k}" for k in (1, 2, 3)]
    else:
        targets = [[prefix + "carbon dioxide"], [prefix + "four"], [prefix + "true"]]
        assert [ex["targets"] for ex in examples] == targets
        assert examples[0]["options"] == [prefix + t for t in ("oxygen", "carbon dioxide", "helium")]
        assert examples[1]["options"] == [prefix + "four", prefix + "the Answer is five"]
    assert examples[2]["options"] == [prefix + "true", prefix + "false"]  # BoolQ's options are text either way
    assert [ex["answer"] for ex in examples] == [1, 0, 0] and [ex["references"] for ex in examples] == [
        ["answer2"],
        ["answer1"],
        ["true"],
    ]


@pytest.mark.skipif(data_dir() is None, reason="needs the LLM-Adapters mirror (LORAFACTORY_DATA_DIR)")
@pytest.mark.parametrize("folder", ["ARC-Easy", "ARC-Challenge", "openbookqa"])
def test_every_question_of_the_mirror_lists_the_options_its_answer_format_names(folder):
    for split in ("train", "test"):
        raw = json.loads((data_dir() / "llm-adapters" / folder / f"{split}.json").read_text())
        columns = {k: [row[k] for row in raw] for k in ("instruction", "input", "output", "answer")}
        examples = TASKS.get("commonsense/arc_easy").examples(columns, task_cfg("commonsense/arc_easy"))
        assert len(examples) == len(raw)
        for ex in examples:  # each option is its text, the target the right one's
            assert ex["targets"] == [ex["options"][ex["answer"]]] and len(ex["options"]) >= 2
            assert not any(re.fullmatch(r"the correct answer is answer\d", o) for o in ex["options"])


def test_per_character_option_scores_are_the_harness_acc_norm():
    """option_norm=chars picks the option with the best log-likelihood per character of its text, which is not
    always the best summed log-likelihood (that favours short options)."""
    loaded = causal()
    model, tokenizer = loaded.module, loaded.tokenizer
    g = torch.Generator().manual_seed(7)
    contexts = random_prompts(24, seed=5)
    options = [
        [torch.randint(1000, 5000, (int(n),), generator=g).tolist() for n in torch.randint(1, 6, (3,), generator=g)]
        for _ in contexts
    ]
    summed = option_logliks(model, tokenizer.pad_token_id, contexts, options, batch_size=8)
    per_char = [
        [s / len(tokenizer.decode(o)) for s, o in zip(row, opts, strict=True)]
        for row, opts in zip(summed, options, strict=True)
    ]
    picks = [max(range(3), key=row.__getitem__) for row in per_char]
    assert picks != [max(range(3), key=row.__getitem__) for row in summed]  # the two rules disagree somewhere
    rows = Rows(
        {
            "input_ids": contexts,
            "labels": contexts,
            "prompt_ids": contexts,
            "references": [[]] * len(contexts),
            "option_ids": options,
            "answer": picks,
        }
    )
    task = TASKS.get("commonsense/arc_easy")
    assert task._measure(model, tokenizer, rows, task_cfg("commonsense/arc_easy")).metrics == {"accuracy": 1.0}
    plain = task._measure(model, tokenizer, rows, task_cfg("commonsense/arc_easy", option_norm="none"))
    assert plain.metrics["accuracy"] < 1.0


def test_token_nll_is_the_summed_cross_entropy_of_predicted_tokens():
    loaded = causal()
    seqs = random_prompts(4, seed=5)
    labels = [[-100] * 2 + s[2:] for s in seqs]
    total, count = token_nll(loaded.module, loaded.tokenizer.pad_token_id, seqs, labels, batch_size=3)
    expected, n = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            logprobs = torch.log_softmax(loaded.module(input_ids=torch.tensor([s])).logits[0], -1)
            for t in range(2, len(s)):
                expected -= float(logprobs[t - 1, s[t]])
                n += 1
    assert count == n and total == pytest.approx(expected, rel=1e-4)


# --- metrics ---------------------------------------------------------------------------------------------------------


def test_bleu_on_known_strings():
    # n-gram precisions 6/7, 5/6, 4/5, 3/4 and no brevity penalty (the hypothesis is longer): (3/7)^(1/4)
    assert bleu(["the cat sat on the mat today"], [["the cat sat on the mat"]]) == pytest.approx(
        100 * (3 / 7) ** 0.25, abs=1e-6
    )
    assert bleu(["The Cat sat on the mat today"], [["the cat sat on the mat"]]) == pytest.approx(
        100 * (3 / 7) ** 0.25, abs=1e-6
    )  # lowercased, as the E2E challenge scores
    # A second reference that matches the hypothesis makes it perfect; a missing reference counts for nothing.
    assert bleu(["a b c d e"], [["x y", "a b c d e"]]) == pytest.approx(100.0)
    assert bleu(["a b c d e", "f g h i j"], [["a b c d e"], ["z", "f g h i j"]]) == pytest.approx(100.0)


def test_rouge_l_on_known_strings():
    # LCS 3 of 3 predicted and 6 reference tokens: P = 1, R = 1/2, F = 2/3; the best reference counts.
    assert rouge_l(["the cat sat"], [["the cat sat on the mat"]]) == pytest.approx(200 / 3)
    assert rouge_l(["the cat sat"], [["the cat sat on the mat", "the cat sat"]]) == pytest.approx(100.0)
    assert rouge_l(["a", "b"], [["a"], ["c"]]) == pytest.approx(50.0)


ANSWERS = [
    ("Janet sells 9 eggs.\n#### 18", "18", "hashes"),
    ("#### 1,234", "1234", "hashes"),
    ("She pays $1,234.50 in total.\nThe answer is $1,234.50.", "1234.5", "answer_is"),
    ("The final answer is: 42 apples", "42", "answer_is"),
    ("the answer is -3", "-3", "answer_is"),
    ("The answer is 1/2", "0.5", "answer_is"),
    ("so x = \\boxed{\\frac{3}{4}}", "0.75", "boxed"),
    ("The answer is 5, i.e. \\boxed{7}", "7", "boxed"),  # boxed wins over "the answer is"
    ("\\boxed{{12}}", "12", "boxed"),
    ("It is 50% of them", "50", "last_number"),
    ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18", "18", "last_number"),
    ("it costs 10-3", "3", "last_number"),  # a minus sign right after a digit is an operator
    ("x = 3.0", "3", "last_number"),
    ("He has .5 left", "0.5", "last_number"),
    ("#### no number here\nbut 4 later", "4", "last_number"),  # an empty #### falls through
    ("I do not know", None, "none"),
]


@pytest.mark.parametrize(("text", "value", "rule"), ANSWERS, ids=[a[0][:30] for a in ANSWERS])
def test_answer_extraction(text, value, rule):
    found, used = extract_answer(text)
    assert used == rule
    assert (found is None) if value is None else same_number(found, value)


def test_exact_match_counts_which_rule_matched():
    accuracy, rules = exact_match(["#### 18", "The answer is 5", "maybe 7", "none"], ["18", "5.0", "8", "1"])
    assert accuracy == 0.5
    assert rules == {"boxed": 0, "hashes": 1, "answer_is": 1, "last_number": 1, "none": 1}
    assert set(rules) == set(ANSWER_RULES)


# --- the untuned model's evaluation is computed once ---------------------------------------------------------------


def test_untuned_evaluation_is_cached_per_model_and_settings(fake_mirror, tmp_path):
    from lorafactory.training.data import TaskData
    from lorafactory.training.evaluation import Evaluator

    loaded = causal()
    task = TASKS.get("commonsense/boolq")
    cfg = task_cfg("commonsense/boolq", max_eval_samples=4, forgetting_samples=3, eval_batch_size=4)
    data = TaskData(task, loaded.tokenizer, cfg, tmp_path, fake_mirror, 0)
    calls = []
    evaluator = Evaluator(task, data, merge=True)
    original = task.evaluate

    def counting(*args, **kwargs):
        calls.append(args[-1])
        return original(*args, **kwargs)

    object.__setattr__(task, "evaluate", counting)  # frozen dataclass instance
    try:
        first = evaluator.untuned(loaded.module, tiny_cfg("tiny-llama"), tmp_path, fake_mirror)
        second = evaluator.untuned(loaded.module, tiny_cfg("tiny-llama"), tmp_path, fake_mirror)
        cfg.max_eval_samples = 6  # another evaluation set: measured again
        evaluator.untuned(loaded.module, tiny_cfg("tiny-llama"), tmp_path, fake_mirror)
    finally:
        object.__delattr__(task, "evaluate")
    assert calls == ["untuned", "untuned"]
    assert isinstance(second, Evaluation) and second.metrics == first.metrics and second.heldout_ce == first.heldout_ce
    assert first.chance["accuracy"] >= 0.5 and math.isfinite(first.heldout_ce)


# --- end to end ------------------------------------------------------------------------------------------------------

TINY_NLG = [
    "model=tiny-llama",
    "task.max_steps=2",
    "task.eval_every_n_steps=1",
    "task.batch_size=4",
    "task.eval_batch_size=4",
    "task.max_eval_samples=4",
    "task.val_samples=2",
    "task.max_new_tokens=4",
    "task.forgetting_samples=4",
    "trainer.progress_bar=false",
]


@pytest.mark.parametrize("task", ["nlg/e2e", "math/gsm8k", "commonsense/boolq", "instruct/alpaca"])
def test_each_nlg_family_trains_evaluates_and_records(workdir, task):
    result = subprocess.run(
        [sys.executable, "-m", "lorafactory", *TINY_NLG, f"task={task}", "variant=dora"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [path] = Path(workdir, "runs").rglob("result.json")
    record = json.loads(path.read_text())
    primary = TASKS.get(task).primary_metric
    assert record["status"] == "ok" and record["final_source"] == "test"
    assert record["final_metric"] == record["final"][primary] and primary in record["untuned"]
    assert [h["step"] for h in record["history"]] == [1, 2] and all("loss" in h for h in record["history"])
    assert math.isfinite(record["forgetting"]) and set(record["heldout_ce"]) == {"before", "after"}
    assert record["eval_cost"]["eval_s"] > 0 and record["eval_cost"]["merged"] == 1.0
    assert record["eval_samples"] == {"nlg/e2e": 32, "math/gsm8k": 64, "commonsense/boolq": 64}.get(task, 100)
    # Per test example, what a report bootstraps over: the primary metric recomputed from them is the recorded one.
    examples = record["eval_examples"]
    if primary in EXAMPLE_METRICS:
        assert len(examples["outputs"]) == len(examples["labels"]) == 4
        recomputed = example_metric(primary, examples["outputs"], examples["labels"])
        assert recomputed == pytest.approx(record["final_metric"], abs=1e-9)
    else:
        assert task == "instruct/alpaca" and examples == {}  # a held-out loss is not made of per-example answers
    if task in ("nlg/e2e", "math/gsm8k"):
        assert record["eval_cost"]["tokens_per_s"] > 0 and record["eval_details"]["samples"]
        assert primary in record["history"][-1]  # the small validation subset was generated too
        # Chosen on validation, reported on test.
        assert (
            record["selection_source"] == "validation" and record["selection_metric"] == record["history"][-1][primary]
        )
    if task == "math/gsm8k":
        assert sum(record["eval_details"]["answer_rules"].values()) == 4
    if task == "commonsense/boolq":
        assert record["chance_metric"] is not None
    if task == "nlg/e2e":
        assert "not comparable" in record["data_note"]
    adapter = torch.load(path.parent / "adapter.pt", weights_only=True)
    assert not any(k.startswith("lm_head") or "embed_tokens" in k for k in adapter)  # the LM head stays pretrained


def test_task_prompt_placeholders_are_checked():
    with pytest.raises(ConfigError, match=r"task.prompt uses \{question\}.*\{mr\}"):
        check_overrides(["model=tiny-llama", "task=nlg/e2e", "task.prompt='Q: {question}'"])
