"""The training prompt and targets: QMD's context (its system prompt, no think block) and newline-ended lines.

The byte-for-byte comparison with what the real QMD feeds the model is in tests/test_qmd_real.py; here the pieces
that need no QMD: the pinned text, the chat wrapper node-llama-cpp would pick for a template, token agreement
between training, GRPO and eval, and the targets' shape."""

import pytest

from qmd_unsloth.prompt import (QWEN3, ChatFormat, UnsupportedChatTemplate, chat_format, format_target, messages,
                                parse_completion, qwen3_chat_template, render_example, render_prompt)
from qmd_unsloth.qmd_contract import DEFAULT_SYSTEM_PROMPT, kept_lines
from qmd_unsloth.reward import score_expansion

PINNED_PROMPT = ("<|im_start|>system\nYou are a helpful, respectful and honest assistant. Always answer as helpfully as "
                 "possible.\nIf a question does not make any sense, or is not factually coherent, explain why instead "
                 "of answering something incorrectly. If you don't know the answer to a question, don't share false "
                 "information.<|im_end|>\n<|im_start|>user\n/no_think Expand this search query: auth config<|im_end|>\n"
                 "<|im_start|>assistant\n")
PAIRS = [("vec", "how do I configure authentication"), ("lex", "auth config"), ("hyde", "Set AUTH_SECRET in .env."),
         ("lex", "authentication settings"), ("vec", "where are auth settings stored")]
SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                    "{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_prompt_is_qmds_context_pinned():
    assert render_prompt("auth config") == PINNED_PROMPT
    assert render_prompt("  auth config ") == PINNED_PROMPT
    assert "<think>" not in PINNED_PROMPT and DEFAULT_SYSTEM_PROMPT in PINNED_PROMPT
    assert messages("auth config") == [{"role": "user", "content": "/no_think Expand this search query: auth config"}]


def test_node_llama_cpp_wrapper_is_chosen_from_template_and_architecture():
    assert chat_format(qwen3_chat_template(), "qwen3") == QWEN3 == ChatFormat("Qwen", "")
    assert chat_format(qwen3_chat_template(), None) == QWEN3  # QwenChatWrapper also takes an unknown architecture
    # SmolLM2: a ChatML template on a llama architecture -> ChatML, which writes the model's BOS first
    smol = chat_format(SMOLLM2_TEMPLATE, "llama", "<|im_start|>")
    assert smol == ChatFormat("ChatML", "<|im_start|>")
    assert render_prompt("auth config", smol) == "<|im_start|>" + PINNED_PROMPT
    with pytest.raises(UnsupportedChatTemplate, match="neither Qwen's nor ChatML"):
        chat_format("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}", "llama", "<s>")
    with pytest.raises(UnsupportedChatTemplate, match="no chat template"):
        chat_format(None, "qwen3")


def test_targets_end_every_line_with_a_newline_then_end_of_turn(tokenizer):
    assert format_target(PAIRS) == ("hyde: Set AUTH_SECRET in .env.\nlex: auth config\nlex: authentication settings\n"
                                    "vec: how do I configure authentication\nvec: where are auth settings stored\n")
    ex = render_example("auth config", PAIRS, tokenizer)
    assert ex["prompt"] == PINNED_PROMPT
    assert ex["completion"] == format_target(PAIRS) + "<|im_end|>"
    ids = tokenizer(ex["prompt"] + ex["completion"], add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[-2:]) == "\n<|im_end|>"  # end of turn right after a newline: where QMD's grammar ends


def test_training_grpo_and_eval_prompts_agree_token_for_token(tokenizer):
    ex = render_example("auth config", PAIRS, tokenizer)
    train = tokenizer(text=ex["prompt"] + ex["completion"])["input_ids"]  # as TRL's SFTTrainer tokenizes
    prompt = tokenizer(text=ex["prompt"])["input_ids"]
    eval_ids = tokenizer(render_prompt("auth config"), add_special_tokens=False)["input_ids"]
    assert train[: len(prompt)] == prompt == eval_ids


def test_reward_scores_the_training_completion_and_qmd_keeps_every_line(tokenizer):
    ex = render_example("auth config", PAIRS, tokenizer)
    assert score_expansion("auth config", ex["completion"]).score > 0.8
    assert len(kept_lines("auth config", ex["completion"][: -len("<|im_end|>")])) == 5


def test_parse_completion_round_trips_and_skips_junk():
    text = format_target(PAIRS) + "Sure! here you go\n<|im_end|>"
    assert parse_completion(text) == [("hyde", "Set AUTH_SECRET in .env."), ("lex", "auth config"),
                                      ("lex", "authentication settings"),
                                      ("vec", "how do I configure authentication"),
                                      ("vec", "where are auth settings stored")]
    assert format_target(parse_completion(format_target(PAIRS))) == format_target(PAIRS)
