"""The training layout of DESIGN B2 on inputs where the rules are visible."""
from __future__ import annotations

import torch


def test_padding_goes_after_the_answer_and_labels_cover_only_the_answer(tiny_models, ref_tensors):
    model = tiny_models["vicuna0"]
    tok = model.llama_tokenizer
    prompts = ["<Img><ImageHere></Img> short", "<Img><ImageHere></Img> a much longer instruction here"]
    answers = ["a much longer answer than the other one", "ok"]
    samples = {"image": ref_tensors["images"], "answer": answers, "instruction_input": prompts}
    with torch.no_grad():
        embeds, mask, labels = model.prepare_inputs(samples)
        img, _ = model.encode_img(ref_tensors["images"])
    n_img = img.shape[1]
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        before, after = prompt.split("<ImageHere>")
        n_in = len(tok(before, add_special_tokens=False).input_ids) + n_img + len(tok(after, add_special_tokens=False).input_ids)
        answer_ids = tok(answer + model.end_sym, add_special_tokens=False).input_ids
        start = 1 + n_in  # after BOS and the wrapped input
        assert labels[i, :start].eq(-100).all()
        assert labels[i, start : start + len(answer_ids)].tolist() == answer_ids
        assert labels[i, start + len(answer_ids) :].eq(-100).all()
        # real tokens first, then all padding (answer padding and input padding) at the end
        real = mask[i].tolist()
        n_real = 1 + n_in + len(answer_ids)
        assert real == [1] * n_real + [0] * (len(real) - n_real)
        bos = model.embed_tokens(torch.tensor([tok.bos_token_id]))[0]
        torch.testing.assert_close(embeds[i, 0], bos)
        torch.testing.assert_close(embeds[i, start : start + len(answer_ids)], model.embed_tokens(torch.tensor(answer_ids)))


def test_frozen_parts_stay_frozen_and_in_eval_mode(tiny_models):
    model = tiny_models["vicuna0"]
    model.train()
    try:
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        assert trainable == ["llama_proj.bias", "llama_proj.weight"]
        for part in (model.visual_encoder, model.ln_vision, model.Qformer, model.llama_model):
            assert not part.training
            assert all(not m.training for m in part.modules())
        assert model.llama_proj.training
    finally:
        model.eval()


def test_loss_backpropagates_only_into_llama_proj(tiny_models, ref_tensors, ref_json):
    model = tiny_models["llama2"]
    model.zero_grad(set_to_none=True)
    loss = model({"image": ref_tensors["images"], "answer": ref_json["answers"]})["loss"]
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"llama_proj.weight", "llama_proj.bias"}
    model.zero_grad(set_to_none=True)



def test_answers_inside_the_prompt_are_labelled_with_llama_tokens(tiny_models, ref_tensors):
    """``answer_spans`` (a conversation's earlier answers, see synthetic_shapes.every_answer) on
    the reference's LLaMA tokenizer, whose word tokens carry the space before them: the labelled
    tokens are the earlier answer and the last answer, nothing of the template around them."""
    import pytest

    model = tiny_models["vicuna0"]
    tok = model.llama_tokenizer
    prompts = ["<Img><ImageHere></Img> first question###Assistant: a red circle###Human: next", "<Img><ImageHere></Img> no history"]
    at = prompts[0].index("a red circle")
    samples = {"image": ref_tensors["images"], "answer": ["the last", "b"], "instruction_input": prompts, "answer_spans": [[(at, at + 12)], []]}
    with torch.no_grad():
        _, _, labels = model.prepare_inputs(samples)
    # "▁a" spans " a": its space lies before the answer, the token is the answer's
    assert [tok.decode(row[row != -100].tolist()) for row in labels] == ["a red circle the last" + model.end_sym, "b" + model.end_sym]
    del samples["instruction_input"]
    with torch.no_grad(), pytest.raises(ValueError, match="answer_spans but no instruction_input"):
        model.prepare_inputs(samples)
